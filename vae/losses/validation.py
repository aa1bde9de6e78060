"""Input checks shared by every function in :mod:`vae.losses`.

Two kinds of check exist, and they cost very different amounts:

* **Shape checks** (broadcastability, a valid ``dim``, a batch dimension) read only tensor
  metadata. They are always on: they cost microseconds and never touch the data.
* **Value checks** (NaN/Inf, negative probabilities, rows that do not sum to 1, Bernoulli
  targets outside [0, 1], positive Cholesky diagonals) read the data and, on a GPU, force a
  host-device synchronisation. They are on by default and are what the switch controls.

The switch, from narrowest to widest scope:

* ``validate=False`` on a single call;
* ``with validation(False): ...`` for a block (the previous setting is restored on exit);
* ``set_validation(False)`` for the whole process.

``validate=None`` (the default of every public function) means "use the global setting".
Every error is a :class:`ValueError` whose message starts with the function name and names
the offending argument, so that the fix is obvious from the message alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "set_validation",
    "validation_enabled",
    "validation",
    "should_validate",
]

_validation_enabled = True


def set_validation(enabled: bool) -> None:
    """Switch the value checks on or off for the whole process."""
    global _validation_enabled
    if not isinstance(enabled, bool):
        raise ValueError(
            f"set_validation: argument 'enabled' must be True or False, got {enabled!r}"
        )
    _validation_enabled = enabled


def validation_enabled() -> bool:
    """Whether value checks run when a function is called with ``validate=None``."""
    return _validation_enabled


@contextmanager
def validation(enabled: bool) -> Iterator[None]:
    """Context manager that sets the global switch and restores the previous value on exit."""
    previous = _validation_enabled
    set_validation(enabled)
    try:
        yield
    finally:
        set_validation(previous)


def should_validate(validate: bool | None) -> bool:
    """Resolve a per-call ``validate`` argument against the global switch."""
    if validate is None:
        return _validation_enabled
    if not isinstance(validate, bool):
        raise ValueError(f"argument 'validate' must be True, False or None, got {validate!r}")
    return validate


# --------------------------------------------------------------------------------------------
# Shape checks (always on)
# --------------------------------------------------------------------------------------------


def require_tensor(fn: str, name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(
            f"{fn}: argument '{name}' must be a torch.Tensor, got {type(x).__name__}; "
            f"wrap it with torch.as_tensor(...)"
        )
    if x.is_complex():
        # KL, entropies and likelihoods are defined for real numbers; torch would fail later
        # with a NotImplementedError deep inside a kernel, or silently drop the imaginary part.
        raise ValueError(
            f"{fn}: argument '{name}' must be a real floating-point tensor, got {x.dtype}; "
            f"pass its real part (.real) or its magnitude (.abs()), whichever you mean"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"{fn}: argument '{name}' must have a floating-point dtype, got {x.dtype}; "
            f"convert it with .float() or .double()"
        )
    return x


def common_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype that :func:`torch.promote_types` gives for all of ``tensors`` together."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def promote(*tensors: Tensor) -> tuple[Tensor, ...]:
    """``tensors`` converted to their :func:`common_dtype` (no copy where already in it).

    Mixed dtypes are promoted, not refused: float32 with float64 computes in float64, float16
    with bfloat16 in float32. Every such conversion is exact (the wider type holds every value
    of the narrower one), so promotion changes no value, only the precision of the arithmetic.
    It must happen *before* any logarithm or softmax: computing log p in float32 and log q in
    float64 rounds the same value two ways, and KL(p, p.double()) came out as -5.7e-8 nats.
    After promotion equal values give log p - log q = 0 exactly, so KL(p, q) = 0 where p = q.
    """
    dtype = common_dtype(*tensors)
    return tuple(t.to(dtype) for t in tensors)


def broadcast_shape(fn: str, **tensors: Tensor) -> torch.Size:
    """The common broadcast shape of ``tensors``, or a ValueError that lists their shapes."""
    shapes = [t.shape for t in tensors.values()]
    if all(s == shapes[0] for s in shapes[1:]):
        return shapes[0]  # the common case, without broadcast_shapes' ~10 us
    try:
        return torch.broadcast_shapes(*shapes)
    except RuntimeError:
        shapes = ", ".join(f"'{n}' {tuple(t.shape)}" for n, t in tensors.items())
        raise ValueError(
            f"{fn}: arguments have shapes that do not broadcast: {shapes}; "
            f"make the shapes equal or broadcastable"
        ) from None


def check_target_and_broadcast(
    fn: str, prediction_name: str, prediction: Tensor, target: Tensor, **spreads: Tensor
) -> None:
    """The shape checks of every (prediction, target) loss: ``target`` has a non-empty batch
    dimension, and the prediction and its ``spreads`` broadcast to the target's shape. Broadcasting the target up to them is refused: that would count the same
    observation several times."""
    if target.dim() < 1:
        raise ValueError(
            f"{fn}: argument 'target' must have a batch dimension, shape (B, ...), got a scalar"
        )
    if target.shape[0] == 0:
        # Not an empty (0,) result: every caller averages it over the batch, and the mean of
        # nothing is NaN. A shape check, always on.
        raise ValueError(
            f"{fn}: argument 'target' is an empty batch (shape {tuple(target.shape)}); "
            f"pass at least one example"
        )
    shape = broadcast_shape(fn, **{prediction_name: prediction}, target=target, **spreads)
    if shape != target.shape:
        names = " and ".join(f"'{name}'" for name in (prediction_name, *spreads))
        raise ValueError(
            f"{fn}: arguments broadcast to shape {tuple(shape)}, larger than 'target' "
            f"{tuple(target.shape)}; {names} must broadcast to the target's shape, not the "
            "other way round"
        )


def normalise_event_dim(fn: str, dim: int, shape: torch.Size, **tensors: Tensor) -> int:
    """Turn ``dim`` into a negative index into ``shape`` and check every tensor spans it fully.

    A distribution cannot be broadcast along its own event dimension: a size-1 "row" stretched
    to K entries is not a probability vector over K outcomes, so that is an error.
    """
    ndim = len(shape)
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise ValueError(f"{fn}: argument 'dim' must be an int, got {dim!r}")
    if ndim == 0 or not -ndim <= dim < ndim:
        raise ValueError(
            f"{fn}: argument 'dim'={dim} is out of range for inputs with {ndim} dimension(s); "
            f"use a value in [{-ndim}, {ndim - 1}]"
        )
    negative_dim = dim - ndim if dim >= 0 else dim
    size = shape[negative_dim]
    for name, t in tensors.items():
        if t.dim() < -negative_dim or t.shape[negative_dim] != size:
            raise ValueError(
                f"{fn}: argument '{name}' with shape {tuple(t.shape)} does not have the full "
                f"event size {size} along dim={dim}; distributions must not be broadcast "
                f"along their event dimension"
            )
    return negative_dim


# --------------------------------------------------------------------------------------------
# Value checks (controlled by the switch)
# --------------------------------------------------------------------------------------------


def check_finite(fn: str, name: str, x: Tensor) -> None:
    """Reject NaN and +-Inf in one tensor."""
    check_all_finite(fn, **{name: x})


def check_all_finite(fn: str, **tensors: Tensor) -> None:
    """Reject NaN and +-Inf in any of ``tensors``, naming the first offending argument.

    Fast path: NaN and +-Inf propagate through sums, so one finite total (accumulated in
    float64) proves every entry of every tensor finite, with one cheap reduction per tensor
    and a single host-device synchronisation for all of them. Only a non-finite total (bad
    input, or overflow of a sum of huge finite values) pays for the elementwise checks.
    """
    total = None
    for t in tensors.values():
        if t.numel():
            s = t.detach().sum().double()
            total = s if total is None else total + s
    if total is None or bool(torch.isfinite(total)):
        return
    for name, x in tensors.items():
        x = x.detach()
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            n_nan = int(torch.isnan(x).sum())
            n_inf = int((~finite).sum()) - n_nan
            raise ValueError(
                f"{fn}: argument '{name}' contains {n_nan} NaN and {n_inf} Inf value(s); "
                f"inputs must be finite"
            )


def check_no_nan(fn: str, name: str, x: Tensor) -> None:
    """Reject NaN only (used where an infinity carries meaning, e.g. -inf logits)."""
    x = x.detach()
    if bool(torch.isnan(x).any()):
        raise ValueError(
            f"{fn}: argument '{name}' contains {int(torch.isnan(x).sum())} NaN value(s)"
        )


PROBABILITY_TOLERANCE = 5e-3
"""Allowed |sum - 1| of a row of probabilities, the same for every dtype and event size K.

What an honest softmax leaves: rounding each exact probability p_i to a dtype with unit
roundoff u changes it by at most u * p_i, so the row sum moves by at most u * sum_i p_i = u,
*whatever K is* (K only enters through subnormals, below). Measured maxima of |sum - 1| over
softmaxes of N(0, s^2) logits (s from 0 to 30, K in {2, 10, 32, 512, 1e4, 1e5}), both rounded
from float64 and computed natively in the dtype, plus uniform rows for every K <= 2000:

==========  ==================  ============================================================
dtype       u                   largest |sum - 1| measured
==========  ==================  ============================================================
bfloat16    2^-8  = 3.9e-3      3.9e-3 (uniform row, K = 255); random logits 2.8e-3
float16     2^-11 = 4.9e-4      3.6e-4 for K <= 1e4; 3.0e-3 at K ~ 1e5 (uniform, K = 99569)
float32     2^-24 = 6.0e-8      4.2e-8 rounded; 4.0e-6 computed natively at K = 1e5
==========  ==================  ============================================================

float16's exception is its subnormal range: entries below 6.1e-5 keep only an absolute
precision of 2^-25 = 3e-8 each, so a row can move by up to K * 3e-8 (3e-3 at K = 1e5, 3e-2 at
K = 1e6: float16 cannot hold an honest softmax over a million classes).

Why one number for every dtype rather than one per dtype: a row is often rounded in a low
precision and upcast afterwards (a bf16 model's softmax passed as ``.float()`` or
``.double()``), so the dtype the check sees says nothing about the rounding the row went
through. A float64 row may honestly be off by bf16's 3.9e-3.

Why 5e-3: it accepts bf16's worst case 2^-8 = 3.9e-3 (and float16's 3.0e-3 up to K = 1e5)
with a margin of 1.1e-3, and rejects every row whose sum is off by 1% or more, in every dtype:
a row scaled by 1 +- 0.01 and then rounded to bf16 sums to at worst 1.01 * (1 - 2^-8) =
1.0061 or 0.99 * (1 + 2^-8) = 0.9939, still 1.1e-3 beyond the tolerance (float16 up to
K = 1e5: 7.3e-3 measured). Real normalisation mistakes (an unnormalised row, a softmax
applied twice, logits passed as probabilities) are off by far more than 1%. The price of a
row accepted at |sum - 1| = delta <= 5e-3: KL(p || q) is off by about delta * (KL + 1) nats
when p is off, by -log(1 + delta) ~ -delta nats when q is.
"""


def check_probabilities(fn: str, name: str, p: Tensor, dim: int) -> None:
    """Finite, non-negative, and summing to 1 along ``dim`` within
    :data:`PROBABILITY_TOLERANCE` (5e-3, whatever the dtype and the event size)."""
    p = p.detach()
    check_finite(fn, name, p)
    minimum = float(p.min()) if p.numel() else 0.0
    if minimum < 0:
        raise ValueError(
            f"{fn}: argument '{name}' has negative entries (min {minimum:.4g}); "
            f"probabilities must be >= 0"
        )
    if p.numel() == 0:
        return
    # Sum in float64 so that the check itself adds no rounding error.
    deviation = float((p.double().sum(dim) - 1.0).abs().max())
    if deviation > PROBABILITY_TOLERANCE:
        raise ValueError(
            f"{fn}: argument '{name}' has rows along dim={dim} that do not sum to 1 "
            f"(largest |sum - 1| = {deviation:.3g}, tolerance {PROBABILITY_TOLERANCE:g} in "
            f"any dtype); normalise it, e.g. p / p.sum(dim, keepdim=True), or pass logits to "
            f"the *_from_logits variant"
        )


def check_logits(fn: str, name: str, logits: Tensor, dim: int) -> None:
    """NaN and +inf are errors; -inf means probability 0, but a row needs one finite logit."""
    logits = logits.detach()
    check_no_nan(fn, name, logits)
    if bool((logits == math.inf).any()):
        raise ValueError(
            f"{fn}: argument '{name}' contains +inf; logits must be finite or -inf (= probability 0)"
        )
    if logits.numel() and not bool(torch.isfinite(logits).any(dim).all()):
        raise ValueError(
            f"{fn}: argument '{name}' has a row along dim={dim} whose logits are all -inf; "
            f"at least one outcome must have non-zero probability"
        )


def check_unit_interval(fn: str, name: str, x: Tensor) -> None:
    """Finite and within [0, 1] (Bernoulli targets)."""
    x = x.detach()
    check_finite(fn, name, x)
    if x.numel() == 0:
        return
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise ValueError(
            f"{fn}: argument '{name}' has values outside [0, 1] (min {lo:.4g}, max {hi:.4g}); "
            f"Bernoulli targets must lie in [0, 1], e.g. pixel intensities divided by 255"
        )


# --------------------------------------------------------------------------------------------
# Checks on plain Python hyper-parameters (schedules, regularisers)
# --------------------------------------------------------------------------------------------

UNITS = {"nats": 1.0, "bits": 1.0 / math.log(2.0)}
"""The ``unit`` argument of every function that returns an information quantity: the factor
from nats (natural logarithm, this project's unit) to that unit. 1 bit = ln 2 nats."""


def in_unit(fn: str, value: Any, unit: str) -> Any:
    """``value`` (nats: a tensor or a float) converted to ``unit``."""
    try:
        factor = UNITS[unit]
    except (KeyError, TypeError):
        raise ValueError(
            f"{fn}: argument 'unit' must be one of {sorted(UNITS)}, got {unit!r}"
        ) from None
    if factor == 1.0:
        return value  # nats: no extra kernel, and bit for bit what was computed
    return value * factor


def require_number(owner: str, name: str, value: object, *, minimum: float = 0.0) -> float:
    """A finite real number >= ``minimum``; returned as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        # Hydra/YAML turns e.g. `1e-3` (no dot) into a string: say so.
        raise ValueError(
            f"{owner}: argument '{name}' must be a number, got {type(value).__name__} {value!r}"
        )
    value = float(value)
    if not math.isfinite(value) or value < minimum:
        raise ValueError(
            f"{owner}: argument '{name}' must be a finite number >= {minimum:g}, got {value!r}"
        )
    return value


def require_int(owner: str, name: str, value: object, *, minimum: int = 0) -> int:
    """An integer >= ``minimum`` (floats with an integral value, e.g. 1000.0, are accepted)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(value.__index__())  # numpy and 0-d integer tensors
        except (AttributeError, TypeError):
            raise ValueError(
                f"{owner}: argument '{name}' must be an integer, got "
                f"{type(value).__name__} {value!r}"
            ) from None
    if value < minimum:
        raise ValueError(f"{owner}: argument '{name}' must be >= {minimum}, got {value}")
    return value
