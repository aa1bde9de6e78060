"""The loss library: exact KL divergences, entropies, likelihoods and KL schedules (pure torch).

Units, stated once for the whole project
----------------------------------------
Every term is in **nats per example**: summed over latent dimensions (KL) or over pixels /
channels / time steps (reconstruction NLL), then averaged over the batch. Elementwise
functions (e.g. :func:`gaussian_kl`) return nats per element and leave the sum to the
caller; per-example functions (the likelihoods) return shape (B,); :func:`compute_elbo`
returns batch means. Natural logarithms throughout; ``unit="bits"`` (entropy,
cross-entropy) and :func:`bits_per_dim` convert where asked (1 bit = ln 2 nats).

This keeps beta meaningful (it weighs the whole KL against the whole reconstruction) and
makes numbers comparable with papers.

Validation
----------
Inputs are checked by default (NaN/Inf, shapes, negative or unnormalised probabilities,
Bernoulli targets outside [0, 1]); every error is a ``ValueError`` naming the argument. For
hot paths pass ``validate=False`` or use :func:`set_validation` / :func:`validation`; see
:mod:`vae.losses.validation`.

This package imports no Lightning and no Hydra.
"""

from vae.losses.elbo import (
    REGULARISER_KINDS,
    BetaKL,
    CapacityKL,
    ELBOTerms,
    FreeBitsKL,
    KLRegulariser,
    build_regulariser,
    compute_elbo,
    kl_regulariser,
)
from vae.losses.kl import (
    KLDivergence,
    MonteCarloKL,
    categorical_kl,
    categorical_kl_from_logits,
    cross_entropy,
    entropy,
    full_gaussian_kl,
    gaussian_kl,
    mc_kl,
)
from vae.losses.likelihoods import (
    CONTINUOUS_LIKELIHOODS,
    LIKELIHOODS,
    PixelLikelihood,
    bernoulli_nll,
    bits_per_dim,
    gaussian_nll,
    get_likelihood,
    laplace_nll,
    uniform_dequantize,
)
from vae.losses.schedules import (
    CapacitySchedule,
    ConstantBeta,
    CyclicalBeta,
    LinearWarmup,
    Schedule,
)
from vae.losses.validation import set_validation, validation, validation_enabled
from vae.losses.vq import (
    codebook_loss,
    codebook_usage,
    commitment_loss,
    perplexity,
    uniform_prior_rate,
    vq_losses,
)

__all__ = [
    # kl
    "gaussian_kl",
    "full_gaussian_kl",
    "categorical_kl",
    "categorical_kl_from_logits",
    "entropy",
    "cross_entropy",
    "mc_kl",
    "MonteCarloKL",
    "KLDivergence",
    # likelihoods
    "bernoulli_nll",
    "gaussian_nll",
    "laplace_nll",
    "bits_per_dim",
    "uniform_dequantize",
    "CONTINUOUS_LIKELIHOODS",
    "LIKELIHOODS",
    "PixelLikelihood",
    "get_likelihood",
    # schedules
    "Schedule",
    "ConstantBeta",
    "LinearWarmup",
    "CyclicalBeta",
    "CapacitySchedule",
    # elbo
    "ELBOTerms",
    "KLRegulariser",
    "BetaKL",
    "CapacityKL",
    "FreeBitsKL",
    "compute_elbo",
    "build_regulariser",
    "kl_regulariser",
    "REGULARISER_KINDS",
    # validation
    "set_validation",
    "validation_enabled",
    "validation",
    # vq
    "vq_losses",
    "codebook_loss",
    "commitment_loss",
    "perplexity",
    "codebook_usage",
    "uniform_prior_rate",
]
