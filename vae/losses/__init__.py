"""The loss library: exact KL divergences, entropies, likelihoods and KL schedules (pure torch).

Units, stated once for the whole project
----------------------------------------
Every term is in **nats per example**: summed over latent dimensions (KL) or over pixels /
channels / time steps (reconstruction NLL), then averaged over the batch. Elementwise
functions (e.g. :func:`gaussian_kl`) return nats per element and leave the sum to the
caller; per-example functions (the likelihoods) return shape (B,); :func:`compute_elbo`
returns batch means. Natural logarithms throughout; ``unit="bits"`` (rule 3 below) and
:func:`bits_per_dim` convert where asked (1 bit = ln 2 nats).

This keeps beta meaningful (it weighs the whole KL against the whole reconstruction) and
makes numbers comparable with papers.

Conventions, one rule each for the whole public API
---------------------------------------------------
1. **Argument order.** A divergence reads like its formula, as in
   ``torch.distributions.kl_divergence(p, q)``: the first distribution is the one the
   expectation is taken under, the left side of ||, and the names say which side each
   argument is on. ``categorical_kl(p, q)`` and ``categorical_kl_from_logits(p_logits,
   q_logits)`` are KL(p || q), ``cross_entropy(p, q)`` is H(p, q) = E_p[-log q],
   ``gaussian_kl(mu, logvar, prior_mu, prior_logvar)`` is KL(posterior || prior),
   ``full_gaussian_kl(mu_q, scale_tril_q, mu_p, scale_tril_p)`` and ``mc_kl(log_q, log_p)``
   (samples from q) are KL(q || p).
   A loss that scores a prediction against data takes ``(prediction, target)``, the
   ``(input, target)`` of every ``torch.nn`` loss: ``bernoulli_nll(logits, target)``,
   ``gaussian_nll(mean, target)``, ``laplace_nll(loc, target)``, the discretised
   ``discretized_logistic_nll(loc, target)`` and its siblings,
   ``PixelLikelihood(...)(params, target)`` and ``KLDivergence(...)(predicted=...,
   target=...)``, which is KL(target || predicted) like :class:`torch.nn.KLDivLoss`. Its two
   tensors are keyword-only: they used to be positional as (target, predicted).
2. **Spread.** A diagonal Gaussian's spread is its log-variance ``logvar`` = log sigma^2
   (natural log) everywhere, in KLs and likelihoods alike (``prior_logvar`` for the second
   Gaussian): what the encoders output, and a variance as in
   :func:`torch.nn.functional.gaussian_nll_loss`. Other spreads keep their
   torch.distributions name: ``log_scale`` = log b for the Laplace, the Cholesky factor
   ``scale_tril`` for a full covariance. A likelihood's spread is keyword-only, so that
   ``gaussian_nll(mean, target, 0.5)`` cannot leave open whether 0.5 is sigma, log sigma or
   log sigma^2. The one spread not in log space is ``PixelLikelihood(sigma=...)``, a positive
   hyper-parameter typed into the config (``model.sigma``).
3. **Unit.** Every *function* that returns an information quantity (a KL, an entropy, a
   cross-entropy, an NLL, a rate) takes a keyword-only ``unit``: ``"nats"`` (default) or
   ``"bits"`` (nats / ln 2). The *objects you train with* (:class:`KLDivergence`,
   :class:`PixelLikelihood`, :func:`compute_elbo` and the regularisers) have none and are
   always in nats, so that their terms add up and beta, the free bits, the capacity and the
   learning rate mean what the config says. :func:`bits_per_dim` is in bits by definition.

The old spellings (``gaussian_nll(log_sigma=...)``, ``laplace_nll``'s spread by position,
``PixelLikelihood(...)(params, x=...)``) still work until version 0.3, with a
``DeprecationWarning`` that names the new spelling; a call whose old positional meaning would
now be a guess (``KLDivergence()(a, b)``, ``gaussian_nll(mean, target, s)``) raises a
``TypeError`` that names it. See :mod:`vae.losses.deprecation`.
``tests/test_losses_conventions.py`` checks each rule over ``__all__``.

Validation
----------
Inputs are checked by default (NaN/Inf, shapes, negative or unnormalised probabilities,
Bernoulli targets outside [0, 1]); every error is a ``ValueError`` naming the argument. For
hot paths pass ``validate=False`` or use :func:`set_validation` / :func:`validation`; see
:mod:`vae.losses.validation`.

This package imports no Lightning and no Hydra.
"""

from vae.losses.decomposition import (
    KLDecomposition,
    kl_decomposition,
    minibatch_log_densities,
)
from vae.losses.discretized import (
    DISCRETIZED_LIKELIHOODS,
    discretized_bin_log_probs,
    discretized_gaussian_nll,
    discretized_logistic_mixture_nll,
    discretized_logistic_nll,
    discretized_mean,
    discretized_sample,
)
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
    # kl_decomposition: where the KL goes (MI, total correlation, dimension-wise KL)
    "kl_decomposition",
    "KLDecomposition",
    "minibatch_log_densities",
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
    # discretized: probability masses of L-level pixels (PixelCNN++'s bins)
    "discretized_logistic_nll",
    "discretized_gaussian_nll",
    "discretized_logistic_mixture_nll",
    "discretized_bin_log_probs",
    "discretized_mean",
    "discretized_sample",
    "DISCRETIZED_LIKELIHOODS",
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
