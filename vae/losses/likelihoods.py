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
from vae.losses.discretized import (
    DISCRETIZED_LIKELIHOODS,
    check_on_grid,
    discretized_gaussian_nll,
    discretized_logistic_mixture_nll,
    discretized_logistic_nll,
    discretized_mean,
    discretized_sample,
    require_levels,
)
from vae.losses.validation import (
    check_all_finite,
    check_target_and_broadcast,
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
    tensors = {prediction_name: prediction, "target": target}
    spread = {}
    if scale_name is not None:
        if isinstance(log_scale, (int, float)) and not isinstance(log_scale, bool):
            log_scale = torch.tensor(float(log_scale), dtype=target.dtype, device=target.device)
        spread[scale_name] = tensors[scale_name] = require_tensor(fn, scale_name, log_scale)
    check_target_and_broadcast(fn, prediction_name, prediction, target, **spread)
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


def _require_levels(fn: str, levels: object, name: str = "dequantization_levels") -> int:
    return require_levels(fn, levels, name)


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
    levels = _require_levels(fn, levels, "levels")
    k = torch.round(x * (levels - 1))
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return (k + u) / levels


Likelihood = Callable[..., Tensor]

LIKELIHOODS: dict[str, Likelihood] = {
    "bernoulli": bernoulli_nll,
    "gaussian": gaussian_nll,
    "laplace": laplace_nll,
    "discretized_logistic": discretized_logistic_nll,
    "discretized_gaussian": discretized_gaussian_nll,
    "discretized_logistic_mixture": discretized_logistic_mixture_nll,
}
"""Registry of reconstruction NLLs by config name; each maps (prediction, target) -> (B,) and
takes its spread, if any, by keyword (``logvar``, ``log_scale``); the discretised ones
(:mod:`vae.losses.discretized`) also take ``levels``."""

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
    * ``discretized_logistic`` / ``discretized_gaussian`` / ``discretized_logistic_mixture``
      (:mod:`vae.losses.discretized`): probability masses of the L = ``data_levels`` bins,
      so no dequantisation and :meth:`bits_per_dim` = nll / (D ln 2) with no offset;
      ``data_levels`` is required. The decoder gives every parameter per pixel:
      :attr:`params_per_channel` values per image channel, parameter-major: a (B, P * C, H, W)
      output is read as (B, P, C, H, W), so output channel p * C + c is parameter p of image
      channel c. P = 2 (location, log scale; the Gaussian's log sigma) or 3K for K mixture
      components (K logits, K locations, K log scales). ``sigma`` is unused.

    Args:
        name: a key of :data:`LIKELIHOODS`.
        num_dims: D, values per example (C * H * W), for bits/dim.
        channels: C; a learned scale has one value per channel.
        sigma: the Gaussian/Laplace scale (its initial value if learned), a positive number:
            the config's ``model.sigma``, set by hand, so not in log space.
        learn_sigma: learn log sigma as a parameter.
        data_levels: distinct pixel values of the data (2 when binarized, 17 for the digits,
            256 for 8-bit images), or None when unknown (then no bits/dim is reported).
        num_mixtures: K, components of ``discretized_logistic_mixture`` per pixel.
    """

    INITIAL_LOG_SCALE = {"logistic": math.log(0.1), "gaussian": math.log(0.2)}
    """The log scale a discretised likelihood's decoder starts from (:meth:`params_for_mean`):
    a standard deviation of about 0.2 of the [0, 1] range (a logistic of s = 0.1 has 0.18),
    about a pixel's spread across a dataset, so that no pixel of the data starts with a
    vanishing probability. On the digits' 17 levels, from the mean image: 3.4 bits/dim for the
    logistic, 3.35 for the Gaussian (6.6 at sigma = 0.1: its light tails)."""

    def __init__(
        self,
        name: str,
        num_dims: int,
        channels: int = 1,
        sigma: float = 1.0,
        learn_sigma: bool = False,
        data_levels: int | None = None,
        num_mixtures: int = 5,
    ):
        super().__init__()
        self.nll_function = get_likelihood(name)
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
            raise ValueError(f"PixelLikelihood: argument 'sigma' must be > 0, got {sigma!r}")
        if data_levels is not None:
            _require_levels("PixelLikelihood", data_levels, "data_levels")
        self.discretized = name in DISCRETIZED_LIKELIHOODS
        if self.discretized and data_levels is None:
            raise ValueError(
                f"PixelLikelihood: likelihood {name!r} needs 'data_levels', the number of pixel "
                f"levels of the data (its DataModule's num_levels: 17 for the digits, 256 for "
                f"8-bit images), got None"
            )
        if self.discretized and learn_sigma:
            raise ValueError(
                f"PixelLikelihood: argument 'learn_sigma' is for gaussian/laplace; {name!r} "
                f"learns a scale per pixel from the decoder: set learn_sigma=false"
            )
        if isinstance(num_mixtures, bool) or not isinstance(num_mixtures, int) or num_mixtures < 1:
            raise ValueError(
                f"PixelLikelihood: argument 'num_mixtures' must be a positive int, got "
                f"{num_mixtures!r}"
            )
        self.name = name
        self.num_dims = num_dims
        self.channels = channels
        self.data_levels = data_levels
        self.num_mixtures = num_mixtures
        self.dequantization_levels = data_levels if name in CONTINUOUS_LIKELIHOODS else None
        log_sigma = torch.full((channels, 1, 1), math.log(sigma))
        if learn_sigma:
            self.log_sigma = torch.nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)

    @property
    def params_per_channel(self) -> int:
        """P, the decoder's output channels per image channel: 1 (logits or location), 2 for
        a discretised logistic / Gaussian (location, log scale), 3K for the mixture."""
        if self.name == "discretized_logistic_mixture":
            return 3 * self.num_mixtures
        return 2 if self.discretized else 1

    def _unpack(self, params: Tensor) -> Tensor:
        """(B, P * C, *spatial) -> (B, P, C, *spatial), or a ValueError if the decoder's
        output does not have this likelihood's P * C channels."""
        expected = self.params_per_channel * self.channels
        if params.dim() < 2 or params.shape[1] != expected:
            raise ValueError(
                f"PixelLikelihood: likelihood {self.name!r} needs {self.params_per_channel} "
                f"decoder output channel(s) per image channel, {expected} in all, but the "
                f"parameters have shape {tuple(params.shape)}; build the decoder with "
                f"params_per_channel * C output channels"
            )
        return params.unflatten(1, (self.params_per_channel, self.channels))

    def _spread(self, packed: Tensor) -> dict[str, Tensor]:
        """The single-component spread keyword of a discretised likelihood, from its packed
        parameters' log scale (log s; log sigma for the Gaussian)."""
        if self.name == "discretized_gaussian":
            return {"logvar": 2 * packed[:, 1]}
        return {"log_scale": packed[:, 1]}

    @old_spellings("likelihood(params, target)", renamed={"x": "target"})
    def forward(self, params: Tensor, target: Tensor) -> Tensor:
        """-log p(target | params) in nats per example, shape (B,), in float32 or wider.

        Always nats: it is the model's reconstruction term, added to a KL in nats.
        """
        params = params if params.dtype in (torch.float32, torch.float64) else params.float()
        if self.discretized:
            # The data's own grid, checked always: a target of another depth (or dequantised)
            # is refused here rather than silently rounded to a level.
            check_on_grid(f"PixelLikelihood({self.name!r})", target, self.data_levels)
            packed = self._unpack(params)
            levels = {"levels": self.data_levels, "validate": False}
            if self.name == "discretized_logistic_mixture":  # packed is (B, 3K, C, H, W)
                return self.nll_function(packed, target, **levels)
            return self.nll_function(packed[:, 0], target, **self._spread(packed), **levels)
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
        """E[x | params] for display: sigmoid(logits) for Bernoulli, the location for
        Gaussian/Laplace, and for a discretised likelihood its mean in the data range
        (:func:`vae.losses.discretized.discretized_mean`, within half a level of E[x])."""
        if self.discretized:
            return self._discretized(discretized_mean, params)
        return torch.sigmoid(params) if self.name == "bernoulli" else params

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One draw of x | params, in the data's range: Bernoulli draws, the location plus
        noise of the fixed scale (a density's draw, not on the pixel grid), or an exact draw
        of the discretised likelihood on the grid k / (L-1)."""
        if self.discretized:
            return self._discretized(discretized_sample, params, generator=generator)
        if self.name == "bernoulli":
            return torch.bernoulli(torch.sigmoid(params), generator=generator)
        if self.name == "gaussian":
            noise = torch.randn(
                params.shape, generator=generator, dtype=params.dtype, device=params.device
            )
        else:  # Laplace(0, 1) by inversion: -sign(u) log(1 - 2|u|), u ~ U(-1/2, 1/2)
            u = torch.rand(
                params.shape, generator=generator, dtype=params.dtype, device=params.device
            )
            noise = -(u - 0.5).sign() * torch.log1p(-2 * (u - 0.5).abs())
        return params + torch.exp(self.log_sigma) * noise

    def _discretized(self, function: Callable[..., Tensor], params: Tensor, **kwargs) -> Tensor:
        packed = self._unpack(params.float() if params.dtype != torch.float64 else params)
        if self.name == "discretized_logistic_mixture":
            return function(self.name, packed, levels=self.data_levels, **kwargs)
        return function(
            self.name, packed[:, 0], levels=self.data_levels, **self._spread(packed), **kwargs
        )

    def params_for_mean(self, mean: Tensor, margin: float = 1e-3) -> Tensor:
        """The parameters (P * C, H, W) whose mean is about ``mean`` (C, H, W), in [0, 1], for
        initialising a decoder's output bias at the data's pixel means: the logit for
        Bernoulli (the mean kept in [margin, 1 - margin] first, so that a pixel that is 0 in
        every training image starts at logit(0.001) = -6.9, not -inf), the location
        otherwise. A discretised likelihood's log scales start at :attr:`INITIAL_LOG_SCALE`,
        and a mixture's logits at 0 (equal weights), every component at the mean."""
        if self.discretized:
            family = "gaussian" if self.name == "discretized_gaussian" else "logistic"
            log_scale = torch.full_like(mean, self.INITIAL_LOG_SCALE[family])
            if self.name == "discretized_logistic_mixture":
                k = self.num_mixtures
                parts = [torch.zeros_like(mean)] * k + [mean] * k + [log_scale] * k
            else:
                parts = [mean, log_scale]
            return torch.cat(parts, dim=0)
        if self.name != "bernoulli":
            return mean
        return torch.logit(mean.clamp(margin, 1 - margin))

    @property
    def reports_bits_per_dim(self) -> bool:
        """Whether :meth:`bits_per_dim` has a number comparable with papers."""
        if self.data_levels is None:
            return False
        return self.discretized or self.dequantization_levels is not None or self.data_levels == 2

    def bits_per_dim(self, nll: Tensor | float) -> Tensor | float | None:
        """``nll`` (nats per example) as bits per dimension (see the class docstring), or None."""
        if not self.reports_bits_per_dim:
            return None
        return bits_per_dim(nll, self.num_dims, self.dequantization_levels)
