"""Argument checks shared by the networks.

Each check raises ``ValueError`` with a message that starts with the class and the argument,
e.g. ``MLPEncoder: argument 'hidden_dims' must be a non-empty list of positive ints, got []``.
The networks know nothing of the Hydra config: ``vae.training.config`` names the config key
of a bad value before any network is built.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence


def _as_positive_int(value: object) -> int | None:
    """``value`` as an int if it is an integer > 0 (not a bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        number = operator.index(value)
    except TypeError:
        return None
    return number if number > 0 else None


def positive_int(value: object, owner: str, name: str) -> int:
    """Return ``value`` as an ``int`` if it is an integer > 0, else raise ``ValueError``."""
    number = _as_positive_int(value)
    if number is None:
        raise ValueError(f"{owner}: argument '{name}' must be a positive integer, got {value!r}.")
    return number


def positive_int_list(
    values: object, owner: str, name: str, *, allow_empty: bool = False
) -> list[int]:
    """``values`` as a list of positive ints; strings, scalars and (by default) ``[]`` fail."""
    numbers = None
    if not isinstance(values, (str, bytes)) and isinstance(values, Sequence):
        numbers = [_as_positive_int(v) for v in values]
    if numbers is None or None in numbers or not (numbers or allow_empty):
        kind = "a list" if allow_empty else "a non-empty list"
        raise ValueError(
            f"{owner}: argument '{name}' must be {kind} of positive ints such as [256, 128], "
            f"got {values!r}."
        )
    return numbers


def image_shape(shape: object, owner: str, name: str) -> tuple[int, int, int]:
    """Return ``shape`` as ``(C, H, W)``: exactly three positive ints, channels first."""
    numbers = None
    if not isinstance(shape, (str, bytes)) and isinstance(shape, Sequence) and len(shape) == 3:
        numbers = [_as_positive_int(v) for v in shape]
    if numbers is None or None in numbers:
        raise ValueError(
            f"{owner}: argument '{name}' must be an image shape (channels, height, width) of "
            f"positive ints such as (1, 28, 28), got {shape!r}."
        )
    channels, height, width = numbers
    return channels, height, width


def check_latent(z, latent_dim: int) -> tuple[int, ...]:
    """Check that ``z`` has shape (..., latent_dim) with at least one leading dim; return those dims."""
    if z.dim() < 2 or z.shape[-1] != latent_dim:
        raise ValueError(
            f"z must have shape (batch, {latent_dim}) or (..., batch, {latent_dim}), "
            f"got {tuple(z.shape)}."
        )
    return tuple(z.shape[:-1])


def check_images(x, input_shape: tuple[int, int, int]) -> None:
    """Check that ``x`` is a (batch, C, H, W) batch of the shape an encoder was built for."""
    if x.dim() != 4 or tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(
            f"x must have shape (batch, {', '.join(map(str, input_shape))}), got {tuple(x.shape)}."
        )
