"""Argument checks shared by the networks.

Each check raises ``ValueError`` whose message names the argument (and, where the
argument comes from the Hydra config, the config key) and says how to fix it.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence


def positive_int(value: object, name: str) -> int:
    """Return ``value`` as an ``int`` if it is an integer > 0, else raise ``ValueError``."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a positive integer, got the bool {value!r}.")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(
            f"{name} must be a positive integer, got {value!r} of type {type(value).__name__}."
        ) from None
    if number <= 0:
        raise ValueError(f"{name} must be a positive integer, got {number}.")
    return number


def positive_int_list(values: object, name: str, *, allow_empty: bool = False) -> list[int]:
    """Return ``values`` as a list of positive ints; reject strings, scalars and (by default) ``[]``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(
            f"{name} must be a list of positive integers such as [32, 64], got {values!r}."
        )
    values = list(values)
    if not values and not allow_empty:
        raise ValueError(f"{name} must not be empty; give at least one width, e.g. [256].")
    return [positive_int(v, f"{name}[{i}]") for i, v in enumerate(values)]


def image_shape(shape: object, name: str) -> tuple[int, int, int]:
    """Return ``shape`` as ``(C, H, W)``: exactly three positive ints, channels first."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or len(shape) != 3:
        raise ValueError(
            f"{name} must be an image shape (channels, height, width) such as (1, 28, 28), "
            f"got {shape!r}."
        )
    channels, height, width = (positive_int(v, f"{name}[{i}]") for i, v in enumerate(shape))
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
