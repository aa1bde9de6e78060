"""Reconstruction negative log-likelihoods, in nats per example.

Each function returns -log p(x | z) for every example: shape (B,), summed over all non-batch
dimensions (pixels, channels, time steps), with every normalising constant included, so the
numbers are true (log-)likelihoods that can be compared with papers and across likelihoods.
``unit="bits"`` gives them in bits per example (:func:`bits_per_dim` divides by dimensions).

Every function takes ``(prediction, target)``, like torch's losses, and its spread by keyword
only: ``logvar`` (log sigma^2) for the Gaussian, as in :func:`vae.losses.gaussian_kl`, and
``log_scale`` (log b) for the Laplace. The prediction (logits / mean / loc, and the spread)
must broadcast to ``target``'s shape, and ``target``'s first dimension is the batch.
Broadcasting the *target* up to the prediction is refused, because that silently counts the
same observation several times.

Empty inputs: an empty batch (B = 0) is a ValueError, since the NLL is always averaged over
the batch next and the mean of nothing is NaN; B > 0 examples with no elements each (shape
(B, 0)) have NLL 0, the log of an empty product.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from vae.losses.deprecation import old_spellings
from vae.losses.validation import (
    broadcast_shape,
    check_all_finite,
    check_unit_interval,
    in_unit,
    require_tensor,
    should_validate,
)

__all__ = [
    "bernoulli_nll",
    "gaussian_nll",
    "laplace_nll",
    "bits_per_dim",
    "uniform_dequantize",
    "CONTINUOUS_LIKELIHOODS",
    "LIKELIHOODS",
    "PixelLikelihood",
    "get_likelihood",
]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_LOG_2 = math.log(2.0)


def _prepare(
    fn: str,
    prediction_name: str,
    prediction: Tensor,
    target: Tensor,
    scale_name: str | None = None,
    log_scale: Tensor | float | None = None,
    *,
    validate: bool | None,
) -> Tensor | None:
    """Shared checks; returns ``log_scale`` as a tensor on the target's dtype and device."""
    require_tensor(fn, prediction_name, prediction)
    require_tensor(fn, "target", target)
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
    tensors = {prediction_name: prediction, "target": target}
    if scale_name is not None:
        if isinstance(log_scale, (int, float)) and not isinstance(log_scale, bool):
            log_scale = torch.tensor(float(log_scale), dtype=target.dtype, device=target.device)
        tensors[scale_name] = require_tensor(fn, scale_name, log_scale)
    shape = broadcast_shape(fn, **tensors)
    if shape != target.shape:
        raise ValueError(
            f"{fn}: arguments broadcast to shape {tuple(shape)}, larger than 'target' "
            f"{tuple(target.shape)}; '{prediction_name}'"
            + (f" and '{scale_name}'" if scale_name else "")
            + " must broadcast to the target's shape, not the other way round"
        )
    if should_validate(validate):
        check_all_finite(fn, **tensors)
        if fn == "bernoulli_nll":
            check_unit_interval(fn, "target", target)
    return tensors.get(scale_name) if scale_name is not None else None


def _sum_per_example(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).sum(1)


def bernoulli_nll(
    logits: Tensor, target: Tensor, *, unit: str = "nats", validate: bool | None = None
) -> Tensor:
    r"""-log Bernoulli(target | sigmoid(logits)), summed per example, in nats.

    Per element: -[x log sigmoid(l) + (1 - x) log(1 - sigmoid(l))]
    = softplus(l) - x * l, evaluated stably by ``binary_cross_entropy_with_logits``.
    This is a normalised likelihood for binary x in {0, 1}. For grey levels x in (0, 1) it is
    the usual binary cross-entropy, which is *not* a normalised density (see the continuous
    Bernoulli, Loaiza-Ganem & Cunningham 2019); binarise the data to report a true NLL.

    Args:
        logits: decoder logits, broadcastable to ``target``.
        target: observations in [0, 1], shape (B, ...).
        unit: "nats" or "bits".

    Returns:
        NLL in ``unit``, shape (B,).
    """
    fn = "bernoulli_nll"
    _prepare(fn, "logits", logits, target, validate=validate)
    per_element = F.binary_cross_entropy_with_logits(
        logits.expand_as(target), target, reduction="none"
    )
    return in_unit(fn, _sum_per_example(per_element), unit)


@old_spellings(
    "gaussian_nll(mean, target, logvar=2 * log_sigma)",
    renamed={"log_sigma": ("logvar", lambda log_sigma: 2 * log_sigma)},
    refuse_positional="the spread is the keyword-only logvar = log sigma^2; in version 0.1 "
    "the third positional argument was log_sigma = log sigma",
)
def gaussian_nll(
    mean: Tensor,
    target: Tensor,
    *,
    logvar: Tensor | float = 0.0,
    unit: str = "nats",
    validate: bool | None = None,
) -> Tensor:
    r"""-log N(target | mean, sigma^2), summed per example, in nats, with logvar = log sigma^2.

    Per element: 0.5 * log(2 pi) + 0.5 * logvar + (x - mean)^2 / (2 exp(logvar)).
    With the default logvar = 0 (sigma = 1) this is 0.5 * squared error + 0.919 nats per
    element, *not* the bare squared error: the constant makes it a real likelihood. The
    spread is a log-variance, as in :func:`vae.losses.gaussian_kl` and as the variance of
    :func:`torch.nn.functional.gaussian_nll_loss`; for a standard deviation sigma pass
    ``logvar=2 * log(sigma)``. (The old keyword ``log_sigma`` still works, converted so, with a
    DeprecationWarning.)

    Args:
        mean: decoder mean, broadcastable to ``target``.
        target: observations, shape (B, ...).
        logvar: natural log of the variance, keyword-only: a fixed float, or a tensor
            broadcastable to ``target`` for a learned variance (shared scalar, per pixel, or
            per example).
        unit: "nats" or "bits".

    Returns:
        NLL in ``unit``, shape (B,).
    """
    fn = "gaussian_nll"
    logvar = _prepare(fn, "mean", mean, target, "logvar", logvar, validate=validate)
    # log sigma = logvar / 2 exactly (a power of 2), so a caller holding log sigma (such as
    # PixelLikelihood, which passes 2 * log sigma) gets the numbers of the log sigma formula.
    log_sigma = 0.5 * logvar
    standardised = (target - mean) * torch.exp(-log_sigma)
    per_element = _HALF_LOG_2PI + log_sigma + 0.5 * standardised.square()
    return in_unit(fn, _sum_per_example(per_element.expand_as(target)), unit)


@old_spellings("laplace_nll(loc, target, log_scale=...)", positional=("log_scale",))
def laplace_nll(
    loc: Tensor,
    target: Tensor,
    *,
    log_scale: Tensor | float = 0.0,
    unit: str = "nats",
    validate: bool | None = None,
) -> Tensor:
    r"""-log Laplace(target | loc, b), summed per example, in nats.

    Per element: log 2 + log b + |x - loc| / b, with b = exp(log_scale).

    Args:
        loc: decoder location (the median), broadcastable to ``target``.
        target: observations, shape (B, ...).
        log_scale: natural log of the scale b (torch.distributions.Laplace's ``scale``), a
            float or a tensor broadcastable to ``target``; keyword-only.
        unit: "nats" or "bits".

    Returns:
        NLL in ``unit``, shape (B,).
    """
    fn = "laplace_nll"
    log_scale = _prepare(fn, "loc", loc, target, "log_scale", log_scale, validate=validate)
    per_element = _LOG_2 + log_scale + (target - loc).abs() * torch.exp(-log_scale)
    return in_unit(fn, _sum_per_example(per_element.expand_as(target)), unit)


def bits_per_dim(
    nll_nats: Tensor | float, num_dims: int, dequantization_levels: int | None = None
) -> Tensor | float:
    r"""An NLL in nats per example as bits per dimension, comparable with the literature.

    * A probability mass function of the data (Bernoulli on binary pixels, a discretised
      likelihood): ``nll / (num_dims * ln 2)``, a change of units only.
    * A density (Gaussian, Laplace) evaluated on uniformly dequantised pixels
      y = (k + u) / L (see :func:`uniform_dequantize`): pass ``dequantization_levels=L``. The
      result is ``nll / (num_dims * ln 2) + log2(L)``, an upper bound on the bits per
      dimension of the discrete pixels k, because for the probability of k's bin,
      -log P(k) = D log L - log E_u p(y) <= E_u[-log p(y)] + D log L (Jensen; Theis et al.
      2016, "A note on the evaluation of generative models"). Without the offset a density
      can give negative "bits", which is meaningless for discrete data.

    Args:
        nll_nats: -log p(x) (or a bound on it) in nats per example.
        num_dims: dimensions per example (pixels x channels).
        dequantization_levels: L, the number of intensity levels the density's targets were
            dequantised from; None for a likelihood of the discrete data itself.
    """
    if isinstance(num_dims, bool) or not isinstance(num_dims, int) or num_dims < 1:
        raise ValueError(
            f"bits_per_dim: argument 'num_dims' must be a positive int, got {num_dims!r}"
        )
    bits = nll_nats / (num_dims * _LOG_2)
    if dequantization_levels is None:
        return bits
    levels = _require_levels("bits_per_dim", dequantization_levels)
    return bits + math.log2(levels)


def _require_levels(fn: str, levels: object) -> int:
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(
            f"{fn}: argument 'dequantization_levels' must be an int >= 2 (the number of "
            f"intensity levels of the data, e.g. 256 for 8-bit pixels), got {levels!r}"
        )
    return levels


def uniform_dequantize(
    x: Tensor, levels: int, *, generator: torch.Generator | None = None
) -> Tensor:
    r"""Uniform dequantisation of discrete intensities: y = (k + u) / L, u ~ U[0, 1) per entry.

    ``x`` holds the levels k in {0, ..., L-1} rescaled to [0, 1] as x = k / (L - 1) (how every
    DataModule here serves pixels); y then lies in [k / L, (k + 1) / L), a box of volume
    L^-D around each discrete image. A density p fitted to y defines the discrete
    probabilities P(k) = integral of p over k's box, and E_u[-log p(y)] + D log L bounds
    -log P(k) from above, so :func:`bits_per_dim` with ``dequantization_levels=L`` is
    comparable with discrete likelihoods (Uria et al. 2013; Theis et al. 2016).

    Args:
        x: intensities k / (L - 1) in [0, 1], any shape.
        levels: L, the number of levels (17 for scikit-learn's digits, 256 for 8-bit images,
            2 for binarised pixels).
        generator: random stream for u (None: the global one).
    """
    fn = "uniform_dequantize"
    require_tensor(fn, "x", x)
    levels = _require_levels(fn, levels)
    k = torch.round(x * (levels - 1))
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return (k + u) / levels


Likelihood = Callable[..., Tensor]

LIKELIHOODS: dict[str, Likelihood] = {
    "bernoulli": bernoulli_nll,
    "gaussian": gaussian_nll,
    "laplace": laplace_nll,
}
"""Registry of reconstruction NLLs by config name; each maps (prediction, target) -> (B,) and
takes its spread, if any, by keyword (``logvar``, ``log_scale``)."""

CONTINUOUS_LIKELIHOODS = frozenset({"gaussian", "laplace"})
"""Likelihoods that are densities: on discrete pixels they need :func:`uniform_dequantize` and
the log(levels) offset of :func:`bits_per_dim` to give numbers comparable with papers."""


def get_likelihood(name: str) -> Likelihood:
    """The NLL function registered under ``name`` in :data:`LIKELIHOODS`."""
    try:
        return LIKELIHOODS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"get_likelihood: argument 'name' must be one of {sorted(LIKELIHOODS)}, got {name!r}"
        ) from None


class PixelLikelihood(torch.nn.Module):
    r"""p(x | decoder output) for images: one of :data:`LIKELIHOODS`, with its scale, on data of
    a known number of intensity levels. Returns -log p(x | .) in nats per example, shape (B,).

    * ``bernoulli``: the decoder gives logits. A probability only on binary pixels
      (``data_levels == 2``); on grey levels it is a cross-entropy, and :meth:`bits_per_dim`
      is None.
    * ``gaussian`` / ``laplace``: the decoder gives the location; the scale sigma (the
      Gaussian's standard deviation, the Laplace's b) is fixed or learned per channel, held as
      the buffer or parameter ``log_sigma`` (so checkpoints keep their keys) and passed on as
      ``logvar = 2 * log_sigma`` or ``log_scale = log_sigma``. These are densities: on
      discrete pixels (``data_levels`` = L) the targets are uniformly dequantized,
      y = (k + u) / L with fresh u at every call (:func:`uniform_dequantize`), so that
      :meth:`bits_per_dim` = nll / (D ln 2) + log2 L bounds the bits/dim of the discrete
      pixels and compares with the literature.

    Args:
        name: a key of :data:`LIKELIHOODS`.
        num_dims: D, values per example (C * H * W), for bits/dim.
        channels: C; a learned scale has one value per channel.
        sigma: the Gaussian/Laplace scale (its initial value if learned), a positive number:
            the config's ``model.sigma``, set by hand, so not in log space.
        learn_sigma: learn log sigma as a parameter.
        data_levels: distinct pixel values of the data (2 when binarized, 17 for the digits,
            256 for 8-bit images), or None when unknown (then no bits/dim is reported).
    """

    def __init__(
        self,
        name: str,
        num_dims: int,
        channels: int = 1,
        sigma: float = 1.0,
        learn_sigma: bool = False,
        data_levels: int | None = None,
    ):
        super().__init__()
        self.nll_function = get_likelihood(name)
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
            raise ValueError(f"PixelLikelihood: argument 'sigma' must be > 0, got {sigma!r}")
        if data_levels is not None:
            _require_levels("PixelLikelihood", data_levels)
        self.name = name
        self.num_dims = num_dims
        self.data_levels = data_levels
        self.dequantization_levels = data_levels if name in CONTINUOUS_LIKELIHOODS else None
        log_sigma = torch.full((channels, 1, 1), math.log(sigma))
        if learn_sigma:
            self.log_sigma = torch.nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)

    @old_spellings("likelihood(params, target)", renamed={"x": "target"})
    def forward(self, params: Tensor, target: Tensor) -> Tensor:
        """-log p(target | params) in nats per example, shape (B,), in float32 or wider.

        Always nats: it is the model's reconstruction term, added to a KL in nats.
        """
        params = params if params.dtype in (torch.float32, torch.float64) else params.float()
        if self.name == "bernoulli":
            return self.nll_function(params, target, validate=False)
        if self.dequantization_levels is not None:
            target = uniform_dequantize(target, self.dequantization_levels)
        if self.name == "gaussian":
            spread = {"logvar": 2 * self.log_sigma}
        else:
            spread = {"log_scale": self.log_sigma}
        return self.nll_function(params, target, **spread, validate=False)

    def mean(self, params: Tensor) -> Tensor:
        """E[x | params] for display: sigmoid(logits) for Bernoulli, the location otherwise."""
        return torch.sigmoid(params) if self.name == "bernoulli" else params

    def params_for_mean(self, mean: Tensor, margin: float = 1e-3) -> Tensor:
        """The inverse of :meth:`mean`: the parameters whose mean is ``mean`` (in [0, 1]), the
        logit for Bernoulli and the location otherwise. For initialising a decoder's output
        bias at the data's pixel means; the mean is kept in [margin, 1 - margin] first, so that
        a pixel that is 0 in every training image starts at logit(0.001) = -6.9, not -inf."""
        if self.name != "bernoulli":
            return mean
        return torch.logit(mean.clamp(margin, 1 - margin))

    @property
    def reports_bits_per_dim(self) -> bool:
        """Whether :meth:`bits_per_dim` has a number comparable with papers."""
        if self.data_levels is None:
            return False
        return self.dequantization_levels is not None or self.data_levels == 2

    def bits_per_dim(self, nll: Tensor | float) -> Tensor | float | None:
        """``nll`` (nats per example) as bits per dimension (see the class docstring), or None."""
        if not self.reports_bits_per_dim:
            return None
        return bits_per_dim(nll, self.num_dims, self.dequantization_levels)
