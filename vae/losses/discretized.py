r"""Discretised likelihoods of L-level pixels: probability masses of bins, in nats per example.

Pixels take L values k = 0, ..., L-1 (L = 256 for 8-bit images, 17 for the digits, 2 when
binarised) and are served in [0, 1] as x = k / (L - 1). A continuous distribution F of a real
Y (a logistic, a Gaussian, a mixture of logistics) gives every level the mass of its bin,

    P(k) = F(x + delta) - F(x - delta),   delta = 1 / (2 (L - 1))   (half a level),

except that the edge bins reach to infinity: P(0) = F(delta), P(L-1) = 1 - F(1 - delta)
(Salimans et al. 2017, PixelCNN++). The L masses sum to 1 exactly, so -log P(k) is the
negative log-likelihood of the discrete data itself: :func:`vae.losses.bits_per_dim` needs no
dequantisation offset. Equivalently, X = round(clip(Y, 0, 1) * (L-1)) / (L-1).

Every NLL returns shape (B,), summed over the non-batch dimensions, and takes
``(prediction, target)`` with the spread by keyword, as :mod:`vae.losses.likelihoods` does:

* :func:`discretized_logistic_nll` (``loc``, ``log_scale`` = log s of the logistic);
* :func:`discretized_gaussian_nll` (``mean``, ``logvar`` = log sigma^2);
* :func:`discretized_logistic_mixture_nll` (``params`` of K components, layout below).

``levels=L`` is keyword-only and required. Locations and scales are in data units (the
[0, 1] of the targets). Inputs in float16 / bfloat16 are computed in float32; float64 stays
float64.

Numerics, with no epsilon anywhere
----------------------------------
* Logistic: sigma(b) - sigma(a) = sigma(b) sigma(-a) (1 - e^{-(b-a)}) exactly, so
  log P = logsigmoid(b) + logsigmoid(-a) + log(1 - e^{-w}), with w = b - a = 2 delta / s,
  held as log w = log(2 delta) - log s. Every term is a stable function of finite numbers,
  for any scale: this needs no fallback for peaked distributions (PixelCNN++ needs one,
  because it subtracts the two sigmoids).
* Gaussian: log(Phi(b) - Phi(a)) = log Phi(b) + log(1 - e^{-d}), d = log Phi(b) - log Phi(a),
  with ``torch.special.log_ndtr`` and the bin reflected into the left tail (a, b -> -b, -a),
  where the CDF has no rounding near 1. When the bin is narrow against sigma, d cancels; there
  the mass is the density at the bin centre c times the width w (PixelCNN++'s fallback) with
  its next two terms, log phi(c) + log w + log(1 + He_2(c) w^2 / 24 + He_4(c) w^4 / 1920)
  (the mean of phi(c + t) / phi(c) over t in [-w/2, w/2], He_n the Hermite polynomials). Of
  the two forms, the one with the smaller error estimate is used (rounding: about
  eps (1 + |log Phi(b)|) / d; series: its first omitted term), so the fallback changes no
  well-defined value beyond the rounding of the exact form.
* Edge bins: logsigmoid(b), logsigmoid(-a) and log Phi(b), log Phi(-a): exact.

Mixture layout
--------------
``params`` has shape (B, 3K, *event) for targets (B, *event): along dim 1, the K mixture
logits, then the K locations, then the K log scales (log s). Each pixel and channel has its own
mixture; channels are independent given the decoder's input (z, for a VAE), which is exact for
grey images and a modelling choice for RGB (PixelCNN++'s linear coupling of R, G, B is not
implemented). A decoder with C image channels outputs (B, 3K * C, H, W), read as
(B, 3K, C, H, W): channel j * C + c holds parameter j of image channel c.

For display and inspection: :func:`discretized_mean` (E[X], from the CDF in closed form),
:func:`discretized_sample` (exact draws of X) and :func:`discretized_bin_log_probs`
(the (..., L) table of log P(k)), each by likelihood name.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from vae.losses.validation import (
    broadcast_shape,
    check_all_finite,
    check_target_and_broadcast,
    in_unit,
    require_tensor,
    should_validate,
)

__all__ = [
    "discretized_logistic_nll",
    "discretized_gaussian_nll",
    "discretized_logistic_mixture_nll",
    "discretized_bin_log_probs",
    "discretized_mean",
    "discretized_sample",
    "DISCRETIZED_LIKELIHOODS",
]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_LN_2 = math.log(2.0)
GRID_TOLERANCE = 1e-3
"""Largest |x (L-1) - k| (in levels) of a target accepted as level k: float32 holds
k / 255 to within 3e-5 levels, and a target half a level off is off by 500 times this."""


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def require_levels(fn: str, levels: object, name: str = "levels") -> int:
    """``levels`` as an int >= 2, or a ValueError naming ``name``."""
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(
            f"{fn}: argument '{name}' must be an int >= 2 (the number of intensity levels of "
            f"the data, e.g. 256 for 8-bit pixels), got {levels!r}"
        )
    return levels


def check_on_grid(fn: str, target: Tensor, levels: int) -> None:
    """Finite, in [0, 1], and on the grid k / (L - 1), or a ValueError naming 'target'."""
    x = target.detach()
    check_all_finite(fn, target=x)
    if x.numel() == 0:
        return
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise ValueError(
            f"{fn}: argument 'target' has values outside [0, 1] (min {lo:.4g}, max {hi:.4g}); "
            f"pass levels k as k / (levels - 1)"
        )
    scaled = x.double() * (levels - 1)
    off = float((scaled - scaled.round()).abs().max())
    if off > GRID_TOLERANCE:
        raise ValueError(
            f"{fn}: argument 'target' is not on the grid k / {levels - 1} of levels={levels} "
            f"(a value is {off:.3g} levels off): pass the data's own levels (its num_levels), "
            f"and targets that are not dequantised"
        )


def _prepare(
    fn: str,
    prediction_name: str,
    prediction: Tensor,
    target: Tensor,
    levels: object,
    validate: bool | None,
    **spreads: Tensor | float,
) -> tuple[int, Tensor, Tensor, dict[str, Tensor]]:
    """Shared checks; returns (levels, prediction, target, spreads) in the compute dtype."""
    levels = require_levels(fn, levels)
    require_tensor(fn, prediction_name, prediction)
    require_tensor(fn, "target", target)
    tensors = {}
    for name, value in spreads.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = torch.tensor(float(value), device=target.device)
        tensors[name] = require_tensor(fn, name, value)
    check_target_and_broadcast(fn, prediction_name, prediction, target, **tensors)
    if should_validate(validate):
        check_all_finite(fn, **{prediction_name: prediction}, **tensors)
        check_on_grid(fn, target, levels)
    dtype = _compute_dtype(prediction, target, *tensors.values())
    return (
        levels,
        prediction.to(dtype),
        target.to(dtype),
        {n: t.to(dtype) for n, t in tensors.items()},
    )


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (never float16 / bfloat16)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# --------------------------------------------------------------------------------------------
# Per-element log masses
# --------------------------------------------------------------------------------------------


def _level_index(x: Tensor, levels: int) -> Tensor:
    """k = round(x (L-1)), kept in [0, L-1], as the float dtype of ``x``."""
    return torch.round(x * (levels - 1)).clamp(0, levels - 1)


def _log1mexp(w: Tensor, log_w: Tensor) -> Tensor:
    """log(1 - e^{-w}) for w > 0, given w and log w (Maechler 2012): log(-expm1(-w)) up to
    ln 2, log1p(-exp(-w)) above; for w < 1e-3, log w - w/2 + w^2/24, so that a w that
    underflows to 0 (a huge scale) still gives its log w. Each branch sees only arguments in
    its own range (the clamps), so that the branches not taken have finite gradients."""
    small = log_w + (-0.5 + w / 24.0) * w
    middle = torch.log(-torch.expm1(-w.clamp(min=1e-3)))
    large = torch.log1p(-torch.exp(-w.clamp(min=_LN_2)))
    return torch.where(w < 1e-3, small, torch.where(w <= _LN_2, middle, large))


def _standardised_bin(
    loc: Tensor, log_scale: Tensor, x: Tensor, levels: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(k, a, b, log w) of each target's bin in level units: k = round(x (L-1)), the bin
    [k - 1/2, k + 1/2] standardised, a = (k - 1/2 - loc (L-1)) / (s (L-1)) and b likewise,
    and log w = log(b - a) = -log s - log(L-1). In level units the bin edges k +- 1/2 are
    exact, and an off-grid target (unvalidated) counts as its level."""
    k = _level_index(x, levels)
    inverse_scale = torch.exp(-log_scale) / (levels - 1)
    centre = k - loc * (levels - 1)
    log_width = -log_scale - math.log(levels - 1)
    return k, (centre - 0.5) * inverse_scale, (centre + 0.5) * inverse_scale, log_width


def _logistic_log_mass(loc: Tensor, log_scale: Tensor, x: Tensor, levels: int) -> Tensor:
    """log P(k) of the discretised logistic, elementwise (see the module docstring)."""
    k, lower, upper, log_width = _standardised_bin(loc, log_scale, x, levels)
    interior = F.logsigmoid(upper) + F.logsigmoid(-lower) + _log1mexp(log_width.exp(), log_width)
    return torch.where(
        k == 0, F.logsigmoid(upper), torch.where(k == levels - 1, F.logsigmoid(-lower), interior)
    )


def _gaussian_log_mass(mean: Tensor, logvar: Tensor, x: Tensor, levels: int) -> Tensor:
    """log P(k) of the discretised Gaussian, elementwise (see the module docstring)."""
    k, lower, upper, log_width = _standardised_bin(mean, 0.5 * logvar, x, levels)
    # Reflect each bin into the left tail: Phi(b) - Phi(a) = Phi(-a) - Phi(-b).
    flip = lower + upper > 0
    lo = torch.where(flip, -upper, lower)
    hi = torch.where(flip, -lower, upper)
    centre = 0.5 * (lo + hi)  # c <= 0
    width = log_width.exp()
    log_cdf_hi = torch.special.log_ndtr(hi)
    gap = log_cdf_hi - torch.special.log_ndtr(lo)  # d >= 0
    # Error estimates of the two forms: rounding of d, and the series' first omitted term
    # (|He_6(c)| <= 15 (1 + |c|)^6, over 2^6 7 6!).
    exact_error = torch.finfo(x.dtype).eps * (1 + log_cdf_hi.abs()) / gap  # inf if d = 0
    series_error = (width * (1 - centre)).pow(6) / 21504
    use_series = series_error < exact_error
    # Each branch gets harmless arguments where it is not used: no inf/NaN gradients.
    safe_gap = torch.where(use_series, torch.ones_like(gap), gap)
    exact = log_cdf_hi + _log1mexp(safe_gap, safe_gap.log())
    c = torch.where(use_series, centre, torch.zeros_like(centre))
    w2 = torch.where(use_series, width, torch.zeros_like(width)).square()
    c2 = c.square()
    series = (
        -0.5 * c2
        - _HALF_LOG_2PI
        + log_width
        + torch.log1p((c2 - 1) * w2 / 24 + (c2.square() - 6 * c2 + 3) * w2.square() / 1920)
    )
    interior = torch.where(use_series, series, exact)
    return torch.where(
        k == 0,
        torch.special.log_ndtr(upper),
        torch.where(k == levels - 1, torch.special.log_ndtr(-lower), interior),
    )


def _mixture_log_mass(
    logits: Tensor, loc: Tensor, log_scale: Tensor, x: Tensor, levels: int
) -> Tensor:
    """log P(k) of the logistic mixture: the parts (B, K, ...) of the params, ``x``
    broadcastable to them (size 1 or absent at the component dim 1) -> (B, ...)."""
    log_weights = torch.log_softmax(logits, dim=1)
    return torch.logsumexp(log_weights + _logistic_log_mass(loc, log_scale, x, levels), dim=1)


def _split_mixture(fn: str, params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if params.dim() < 2 or params.shape[1] == 0 or params.shape[1] % 3:
        raise ValueError(
            f"{fn}: argument 'params' must have shape (B, 3K, ...) for K components (logits, "
            f"locations, log scales along dim 1), got {tuple(params.shape)}"
        )
    return params.chunk(3, dim=1)


def _sum_per_example(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).sum(1)


# --------------------------------------------------------------------------------------------
# NLLs
# --------------------------------------------------------------------------------------------


def discretized_logistic_nll(
    loc: Tensor,
    target: Tensor,
    *,
    log_scale: Tensor | float,
    levels: int,
    unit: str = "nats",
    validate: bool | None = None,
) -> Tensor:
    r"""-log P(target) under the discretised logistic, summed per example, in nats.

    Per element: -log[sigmoid((x + delta - loc) / s) - sigmoid((x - delta - loc) / s)],
    delta = 1 / (2 (L-1)), s = exp(log_scale), the edge bins reaching to -inf / +inf.

    Args:
        loc: the logistic's location in data units, broadcastable to ``target``.
        target: levels k / (L-1) in [0, 1], shape (B, ...).
        log_scale: log s (torch.distributions' ``scale``), keyword-only; a float or a tensor
            broadcastable to ``target``.
        levels: L, the number of levels (bins).
        unit: "nats" or "bits".

    Returns:
        NLL in ``unit``, shape (B,), float32 (float64 for float64 inputs).
    """
    fn = "discretized_logistic_nll"
    levels, loc, target, spread = _prepare(
        fn, "loc", loc, target, levels, validate, log_scale=log_scale
    )
    log_mass = _logistic_log_mass(loc, spread["log_scale"], target, levels)
    return in_unit(fn, -_sum_per_example(log_mass.expand_as(target)), unit)


def discretized_gaussian_nll(
    mean: Tensor,
    target: Tensor,
    *,
    logvar: Tensor | float,
    levels: int,
    unit: str = "nats",
    validate: bool | None = None,
) -> Tensor:
    r"""-log P(target) under the discretised Gaussian, summed per example, in nats.

    Per element: -log[Phi((x + delta - mean) / sigma) - Phi((x - delta - mean) / sigma)],
    delta = 1 / (2 (L-1)), sigma^2 = exp(logvar), the edge bins reaching to -inf / +inf.

    Args:
        mean: the Gaussian's mean in data units, broadcastable to ``target``.
        target: levels k / (L-1) in [0, 1], shape (B, ...).
        logvar: log sigma^2, keyword-only, as everywhere in :mod:`vae.losses`.
        levels: L, the number of levels (bins).
        unit: "nats" or "bits".

    Returns:
        NLL in ``unit``, shape (B,), float32 (float64 for float64 inputs).
    """
    fn = "discretized_gaussian_nll"
    levels, mean, target, spread = _prepare(
        fn, "mean", mean, target, levels, validate, logvar=logvar
    )
    log_mass = _gaussian_log_mass(mean, spread["logvar"], target, levels)
    return in_unit(fn, -_sum_per_example(log_mass.expand_as(target)), unit)


def discretized_logistic_mixture_nll(
    params: Tensor,
    target: Tensor,
    *,
    levels: int,
    unit: str = "nats",
    validate: bool | None = None,
) -> Tensor:
    r"""-log P(target) under a per-element mixture of K discretised logistics, in nats.

    Per element: -log sum_j pi_j P_j(k), pi = softmax(logits), P_j the discretised logistic
    of component j (Salimans et al. 2017, without the RGB coupling; see the module docstring).

    Args:
        params: shape (B, 3K, *event): K logits, K locations (data units), K log scales
            along dim 1.
        target: levels k / (L-1) in [0, 1], shape (B, *event).
        levels: L, the number of levels (bins).
        unit: "nats" or "bits".

    Returns:
        NLL in ``unit``, shape (B,), float32 (float64 for float64 inputs).
    """
    fn = "discretized_logistic_mixture_nll"
    require_tensor(fn, "params", params)
    require_tensor(fn, "target", target)
    _split_mixture(fn, params)
    if params.shape[0] != target.shape[0] or params.shape[2:] != target.shape[1:]:
        raise ValueError(
            f"{fn}: argument 'params' {tuple(params.shape)} must have shape (B, 3K, *event) "
            f"for 'target' (B, *event) {tuple(target.shape)}"
        )
    # The checks of the other NLLs, on one component's slice (same shape as the target).
    levels, _, target, _ = _prepare(fn, "params", params[:, 0], target, levels, validate)
    if should_validate(validate):
        check_all_finite(fn, params=params)
    logits, loc, log_scale = _split_mixture(fn, params.to(target.dtype))
    log_mass = _mixture_log_mass(logits, loc, log_scale, target.unsqueeze(1), levels)
    return in_unit(fn, -_sum_per_example(log_mass), unit)


# --------------------------------------------------------------------------------------------
# The whole distribution: table, mean, sample
# --------------------------------------------------------------------------------------------

_LOG_MASS: dict[str, Callable[..., Tensor]] = {
    "discretized_logistic": lambda p, s, x, n: _logistic_log_mass(p, s["log_scale"], x, n),
    "discretized_gaussian": lambda p, s, x, n: _gaussian_log_mass(p, s["logvar"], x, n),
    "discretized_logistic_mixture": lambda p, s, x, n: _mixture_log_mass(
        *_split_mixture("", p), x, n
    ),
}
_SPREAD = {
    "discretized_logistic": "log_scale",
    "discretized_gaussian": "logvar",
    "discretized_logistic_mixture": None,
}

DISCRETIZED_LIKELIHOODS = frozenset(_LOG_MASS)
"""Names of the discretised likelihoods, as in ``model.likelihood``."""


def _distribution(
    fn: str, name: str, prediction: Tensor, levels: object, log_scale, logvar
) -> tuple[int, Tensor, dict[str, Tensor]]:
    """Check a (name, prediction, spread) triple; return (levels, prediction, spread) in the
    compute dtype, the spread broadcast to the prediction."""
    if name not in _LOG_MASS:
        raise ValueError(f"{fn}: argument 'name' must be one of {sorted(_LOG_MASS)}, got {name!r}")
    levels = require_levels(fn, levels)
    require_tensor(fn, "prediction", prediction)
    given = {k: v for k, v in (("log_scale", log_scale), ("logvar", logvar)) if v is not None}
    wanted = _SPREAD[name]
    if set(given) != ({wanted} if wanted else set()):
        raise ValueError(
            f"{fn}: {name} takes "
            + (f"the spread '{wanted}' only" if wanted else "no spread (it is inside 'prediction')")
            + f", got {sorted(given) or 'none'}"
        )
    spreads = {}
    for key, value in given.items():
        if not isinstance(value, Tensor):
            value = torch.tensor(float(value))
        spreads[key] = require_tensor(fn, key, value)
    if name == "discretized_logistic_mixture":
        _split_mixture(fn, prediction)
    dtype = _compute_dtype(prediction, *spreads.values())
    prediction = prediction.to(dtype)
    spreads = {k: v.to(dtype=dtype, device=prediction.device) for k, v in spreads.items()}
    spreads = {
        k: v.expand(broadcast_shape(fn, prediction=prediction, **{k: v}))
        for k, v in spreads.items()
    }
    return levels, prediction, spreads


def discretized_bin_log_probs(
    name: str,
    prediction: Tensor,
    *,
    levels: int,
    log_scale: Tensor | float | None = None,
    logvar: Tensor | float | None = None,
) -> Tensor:
    """log P(k) for every level k = 0..L-1: shape (*event_shape, L), in nats.

    ``name`` is a :data:`DISCRETIZED_LIKELIHOODS` entry; ``prediction`` and the spread are
    the arguments of its NLL (``loc`` + ``log_scale``, ``mean`` + ``logvar``, or the
    mixture's ``params`` of shape (B, 3K, *event), whose table is (B, *event, L)). For tests
    and inspection: it holds L values per element.
    """
    fn = "discretized_bin_log_probs"
    levels, prediction, spreads = _distribution(fn, name, prediction, levels, log_scale, logvar)
    grid = torch.arange(levels, dtype=prediction.dtype, device=prediction.device) / (levels - 1)
    spreads = {k: v.unsqueeze(-1) for k, v in spreads.items()}
    return _LOG_MASS[name](prediction.unsqueeze(-1), spreads, grid, levels)


def discretized_mean(
    name: str,
    prediction: Tensor,
    *,
    levels: int,
    log_scale: Tensor | float | None = None,
    logvar: Tensor | float | None = None,
) -> Tensor:
    r"""E[clip(Y, 0, 1)] of the continuous Y behind the discretised X: for display.

    X = round(clip(Y, 0, 1) (L-1)) / (L-1), so |E[X] - E[clip(Y, 0, 1)]| <= 1 / (2 (L-1)),
    half a level (E[X] is the midpoint rule of the same integral int_0^1 P(Y > t) dt). Closed
    forms: s [softplus(loc / s) - softplus((loc - 1) / s)] for the logistic, sigma [G(mean /
    sigma) - G((mean - 1) / sigma)] with G(u) = u Phi(u) + phi(u) for the Gaussian, the
    weighted sum of the components' for the mixture. Arguments as in
    :func:`discretized_bin_log_probs`; shape of the target, in [0, 1].
    """
    fn = "discretized_mean"
    levels, prediction, spreads = _distribution(fn, name, prediction, levels, log_scale, logvar)
    if name == "discretized_gaussian":
        sigma = torch.exp(0.5 * spreads["logvar"])

        def integral_of_cdf(u: Tensor) -> Tensor:
            return u * torch.special.ndtr(u) + torch.exp(-0.5 * u.square() - _HALF_LOG_2PI)

        return sigma * (
            integral_of_cdf(prediction / sigma) - integral_of_cdf((prediction - 1) / sigma)
        )
    if name == "discretized_logistic":
        logits, loc, log_scale_ = None, prediction, spreads["log_scale"]
    else:
        logits, loc, log_scale_ = _split_mixture(fn, prediction)
    scale = torch.exp(log_scale_)
    means = scale * (F.softplus(loc / scale) - F.softplus((loc - 1) / scale))
    if logits is None:
        return means
    return (torch.softmax(logits, dim=1) * means).sum(1)


def discretized_sample(
    name: str,
    prediction: Tensor,
    *,
    levels: int,
    log_scale: Tensor | float | None = None,
    logvar: Tensor | float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One exact draw of X per element, on the grid k / (L-1): Y from the continuous
    distribution (for the mixture, a component by its weights first), then
    X = round(clip(Y, 0, 1) (L-1)) / (L-1). Arguments as in :func:`discretized_bin_log_probs`;
    ``generator``: the random stream (None: the global one)."""
    fn = "discretized_sample"
    levels, prediction, spreads = _distribution(fn, name, prediction, levels, log_scale, logvar)
    if name == "discretized_logistic_mixture":
        logits, loc, log_scale_ = _split_mixture(fn, prediction)
        # Gumbel-max: argmax_j (logit_j + Gumbel noise) is component j with probability pi_j.
        uniform = torch.rand(
            logits.shape, generator=generator, dtype=logits.dtype, device=logits.device
        )
        gumbel = -torch.log(-torch.log(uniform))  # u = 0: -inf, never chosen
        chosen = (logits + gumbel).argmax(1, keepdim=True)
        loc, scale = loc.gather(1, chosen).squeeze(1), log_scale_.gather(1, chosen).squeeze(1).exp()
    elif name == "discretized_logistic":
        loc, scale = prediction, spreads["log_scale"].exp()
    else:
        loc, scale = prediction, torch.exp(0.5 * spreads["logvar"])
    if name == "discretized_gaussian":
        noise = torch.randn(loc.shape, generator=generator, dtype=loc.dtype, device=loc.device)
    else:
        # Logistic noise logit(u); u = 0 gives -inf, which the clip below sends to level 0.
        u = torch.rand(loc.shape, generator=generator, dtype=loc.dtype, device=loc.device)
        noise = torch.log(u) - torch.log1p(-u)
    y = loc + scale * noise
    return _level_index(y.clamp(0, 1), levels) / (levels - 1)
