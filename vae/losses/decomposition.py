r"""Where the KL goes: the decomposition of the mean KL term of a Gaussian VAE.

With q(z|x) = N(mu(x), diag exp(logvar(x))), the prior p(z) = N(0, I) and the aggregate
posterior q(z) = (1/N) sum_n q(z|x_n) over a data set of N examples (Hoffman & Johnson 2016,
"ELBO surgery"; Chen et al. 2018, "Isolating Sources of Disentanglement in VAEs")::

    E_x KL(q(z|x) || p(z)) =  I_q(x; z)                         index-code mutual information
                            + KL(q(z) || prod_j q(z_j))          total correlation (TC)
                            + sum_j KL(q(z_j) || p(z_j))         dimension-wise KL

all in nats per example. I_q(x; z) lies in [0, log N]: a posterior collapsed to the prior has
KL = 0 and I = 0 together; a KL spent on dimensions that say nothing about x shows up in the
dimension-wise term instead.

Two estimators share one kernel, the per-dimension log-densities log q(z_j | x_m):

* :func:`kl_decomposition`: the whole data set's aggregate posterior (a diagnostic, logged
  once per validation epoch and by ``vae-eval``);
* :func:`minibatch_log_densities`: Chen et al.'s minibatch-weighted (MWS) and minibatch-
  stratified (MSS) estimators of log q(z) and log q(z_j), for a training loss (beta-TCVAE).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from vae.losses.kl import gaussian_kl
from vae.losses.validation import check_all_finite, in_unit, require_tensor

__all__ = ["KLDecomposition", "kl_decomposition", "minibatch_log_densities"]

_LOG_2PI = math.log(2.0 * math.pi)
_ELEMENT_BUDGET = 1 << 22  # (points x N x D) elements per chunk: 16 MiB in float32


def gaussian_log_density_per_dim(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z_j; mu_j, exp(logvar_j)) per dimension, broadcast over the leading dims, nats."""
    return -0.5 * (_LOG_2PI + logvar + (z - mu).square() * torch.exp(-logvar))


class KLDecomposition(NamedTuple):
    """What :func:`kl_decomposition` returns: float64 scalar tensors, in its ``unit``."""

    mutual_info: Tensor
    """I_q(x; z) = E[log q(z|x) - log q(z)], in [0, log N] (exactly, for this estimator)."""
    total_correlation: Tensor
    """KL(q(z) || prod_j q(z_j)) = E[log q(z) - sum_j log q(z_j)]."""
    dimwise_kl: Tensor
    """sum_j KL(q(z_j) || p(z_j)): ``kl - mutual_info - total_correlation``."""
    kl: Tensor
    """E_x KL(q(z|x) || p(z)), closed form: the three terms add up to it exactly."""
    standard_error: Tensor
    """(2,): Monte Carlo standard errors of ``mutual_info`` and ``total_correlation``."""


def _check_posterior(fn: str, mu: Tensor, logvar: Tensor) -> None:
    require_tensor(fn, "mu", mu)
    require_tensor(fn, "logvar", logvar)
    if mu.dim() != 2 or mu.shape != logvar.shape:
        raise ValueError(
            f"{fn}: mu and logvar must both have shape (N, latent_dim), got "
            f"{tuple(mu.shape)} and {tuple(logvar.shape)}"
        )
    if not (mu.is_floating_point() and logvar.is_floating_point()):
        raise ValueError(f"{fn}: mu and logvar must be floating-point, got {mu.dtype}")
    check_all_finite(fn, mu=mu, logvar=logvar)


@torch.no_grad()
def kl_decomposition(
    mu: Tensor,
    logvar: Tensor,
    *,
    num_points: int | None = None,
    generator: torch.Generator | None = None,
    kl: Tensor | float | None = None,
    unit: str = "nats",
) -> KLDecomposition:
    r"""MI, TC and dimension-wise KL of the posteriors (mu, logvar) of a whole data set.

    The aggregate posterior is the mixture of all N posteriors, evaluated exactly (with the
    log-sum-exp over all N components) at draws z_i ~ q(z | x_{n_i}), one per point::

        log q(z_i)   = logsumexp_m  sum_j log q(z_ij | x_m)  - log N
        log q(z_ij)  = logsumexp_m  log q(z_ij | x_m)        - log N
        MI = mean_i [log q(z_i | x_{n_i}) - log q(z_i)]      (<= log N: the m = n_i term)
        TC = mean_i [log q(z_i) - sum_j log q(z_ij)]
        dimension-wise KL = KL - MI - TC

    with KL the closed-form mean of :func:`vae.losses.gaussian_kl` over all N. The last line
    is a control variate: the Monte Carlo estimate of the dimension-wise KL,
    mean_i [sum_j log q(z_ij) - log p(z_i)], is shifted by the Monte Carlo error of the KL
    itself (mean_i [log q(z_i|x) - log p(z_i)] against its closed form), so that the three
    terms add up to the KL exactly and only the split between them is estimated. The
    estimate of log q(z) includes the m = n_i component (Chen et al.'s full-data-set
    estimator): consistent, and biased towards a smaller MI by at most O(log N / N) per point.

    Cost: one (points x D) by (D x N) matrix product for q(z), and points x N x D elementwise
    log-densities for the marginals q(z_j), in chunks of ~4M elements, so N = 10,000 examples
    of a 16-dim latent fit in ~16 MiB of scratch memory (1,000 points against 5,000 examples:
    ~0.3 s on one CPU core). The points (draws) can be a random subset (``num_points``) while
    q(z) stays the whole data set's.

    Args:
        mu, logvar: (N, latent_dim) posterior means and log-variances of the data set.
        num_points: draws to average over (a random subset of the N examples without
            replacement, one draw each); None or >= N: every example once.
        generator: for the subset and the draws (a fixed one gives the same numbers twice).
        kl: the data set's mean KL(q(z|x) || p(z)) in nats when the prior is not N(0, I) (a
            VampPrior's Monte Carlo estimate, say); None: the closed form against N(0, I). MI
            and TC do not depend on the prior; the third term is then KL(q(z) || p(z)) - TC,
            which is sum_j KL(q(z_j) || p(z_j)) only for a prior that factorises.
        unit: "nats" or "bits".

    Returns:
        A :class:`KLDecomposition` of float64 scalars (``standard_error`` is (2,)).
    """
    fn = "kl_decomposition"
    in_unit(fn, 0.0, unit)  # an unknown unit fails before any work
    _check_posterior(fn, mu, logvar)
    count, dims = mu.shape
    if count < 2:
        raise ValueError(f"{fn}: needs at least 2 examples to form q(z), got N={count}")
    if num_points is not None and (isinstance(num_points, bool) or int(num_points) < 1):
        raise ValueError(f"{fn}: num_points must be a positive integer or None, got {num_points!r}")
    dtype = torch.promote_types(mu.dtype, torch.float32)
    mu, logvar = mu.to(dtype), logvar.to(dtype)
    device = mu.device
    if num_points is None or num_points >= count:
        index = torch.arange(count, device=device)
    else:
        index = torch.randperm(count, generator=generator)[: int(num_points)].to(device)
    eps = torch.randn(index.shape[0], dims, generator=generator, dtype=dtype).to(device)
    z = mu[index] + torch.exp(0.5 * logvar[index]) * eps  # one draw of q(z | x_{n_i}) each

    log_n = math.log(count)
    # The joint log q(z_i | x_m), summed over dimensions, is one matrix product (float64: the
    # expanded square z^2/var - 2 z mu/var + mu^2/var cancels badly in float32 when |mu| >> sigma):
    #   log q(z_i|x_m) = -1/2 sum_j z_ij^2 / var_mj + sum_j z_ij mu_mj / var_mj + c_m.
    # The per-dimension densities are elementwise, laid out (points, D, N) so that the
    # log-sum-exp over the N components runs along contiguous memory.
    mu64, logvar64 = mu.double(), logvar.double()
    inv_var = torch.exp(-logvar64)  # (N, D)
    scaled_mu = mu64 * inv_var
    constant = (-0.5 * (_LOG_2PI + logvar64) - 0.5 * mu64 * scaled_mu).sum(1)  # (N,)
    mu_t, inv_var_t = mu.T.contiguous(), torch.exp(-logvar).T.contiguous()  # (D, N)
    constant_t = (-0.5 * (_LOG_2PI + logvar)).T.contiguous()  # (D, N)
    chunk = max(1, _ELEMENT_BUDGET // (count * dims))
    mi_terms, tc_terms = [], []
    for start in range(0, z.shape[0], chunk):
        zc = z[start : start + chunk]  # (c, D)
        z64 = zc.double()
        log_q = -0.5 * (z64.square() @ inv_var.T) + z64 @ scaled_mu.T + constant  # (c, N)
        log_qz = torch.logsumexp(log_q, dim=1) - log_n  # (c,)
        per_dim = (zc[:, :, None] - mu_t).square_().mul_(inv_var_t).mul_(-0.5).add_(constant_t)
        log_qz_dims = (torch.logsumexp(per_dim, dim=2).double() - log_n).sum(-1)  # (c,)
        # The own component, read from the same matrix: then logsumexp >= it in floating point
        # too, and MI <= log N holds to the last bit.
        own = index[start : start + chunk]
        log_qz_x = log_q[torch.arange(own.shape[0], device=device), own]
        mi_terms.append(log_qz_x - log_qz)
        tc_terms.append(log_qz - log_qz_dims)
    mi_terms, tc_terms = torch.cat(mi_terms), torch.cat(tc_terms)
    if kl is None:
        kl = gaussian_kl(mu, logvar, validate=False).double().sum(-1).mean()
    else:
        kl = torch.as_tensor(kl, dtype=torch.float64, device=device)
        if kl.numel() != 1 or not bool(torch.isfinite(kl)):
            raise ValueError(f"{fn}: argument 'kl' must be one finite number, got {kl.tolist()}")
        kl = kl.reshape(())
    mutual_info, total_correlation = mi_terms.mean(), tc_terms.mean()
    points = mi_terms.shape[0]
    if points > 1:
        standard_error = torch.stack([mi_terms.std(), tc_terms.std()]) / math.sqrt(points)
    else:
        standard_error = torch.full((2,), math.nan, dtype=torch.float64, device=device)
    return KLDecomposition(
        *(
            in_unit(fn, value, unit)
            for value in (
                mutual_info,
                total_correlation,
                kl - mutual_info - total_correlation,
                kl,
                standard_error,
            )
        )
    )


def minibatch_log_densities(
    z: Tensor, mu: Tensor, logvar: Tensor, dataset_size: int, *, method: str = "mws"
) -> tuple[Tensor, Tensor]:
    r"""Minibatch estimates of log q(z_i) and sum_j log q(z_ij) at the batch's own draws
    (Chen et al. 2018, section 4.1), for a loss that penalises MI, TC or dimension-wise KL.

    With a batch of M draws z_i ~ q(z | x_i) from a data set of size N:

    * ``"mws"`` (minibatch-weighted sampling)::

          log q(z_i) ~ logsumexp_m log q(z_i | x_m) - log(N M)

    * ``"mss"`` (minibatch-stratified sampling): the same sum with Chen et al.'s importance
      weights (each row sums to 1), 1/N for the own example, (N - M + 1) / (N (M - 1)) for
      the next one in the batch and 1 / (M - 1) for each other; unbiased for q(z_i).

    The same weights give log q(z_ij) per dimension. Both are nats, differentiable in z, mu
    and logvar (unlike :func:`kl_decomposition`, which is a no-grad diagnostic).

    Args:
        z: (M, D) the batch's draws, z_i from q(z | x_i).
        mu, logvar: (M, D) the batch's posterior parameters.
        dataset_size: N, the size of the training set (>= M).
        method: "mws" or "mss".

    Returns:
        (log_qz, log_qz_dims): (M,) each; the second is sum_j log q(z_ij).
    """
    fn = "minibatch_log_densities"
    if z.shape != mu.shape or mu.shape != logvar.shape or mu.dim() != 2:
        raise ValueError(
            f"{fn}: z, mu and logvar must have one shape (M, latent_dim), got "
            f"{tuple(z.shape)}, {tuple(mu.shape)} and {tuple(logvar.shape)}"
        )
    batch = z.shape[0]
    if not isinstance(dataset_size, int) or isinstance(dataset_size, bool) or dataset_size < batch:
        raise ValueError(
            f"{fn}: dataset_size must be an integer >= the batch size {batch}, got {dataset_size!r}"
        )
    log_q_dims = gaussian_log_density_per_dim(z[:, None], mu[None], logvar[None])  # (M, M, D)
    if method == "mws":
        log_weights = torch.full(
            (batch, batch), -math.log(dataset_size * batch), dtype=z.dtype, device=z.device
        )
    elif method == "mss":
        log_weights = _stratified_log_weights(batch, dataset_size, z.dtype, z.device)
    else:
        raise ValueError(f"{fn}: method must be 'mws' or 'mss', got {method!r}")
    log_qz = torch.logsumexp(log_q_dims.sum(-1) + log_weights, dim=1)
    log_qz_dims = torch.logsumexp(log_q_dims + log_weights[..., None], dim=1).sum(-1)
    return log_qz, log_qz_dims


def _stratified_log_weights(
    batch: int, dataset_size: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """log of Chen et al.'s MSS weights: row i weighs component m. Each row sums to 1: 1/N for
    the own example, (N - M + 1) / (N (M - 1)) for the next one (stratum of the N - M + 1
    examples outside the batch), 1 / (M - 1) for each of the M - 2 others."""
    if batch < 2:
        return torch.full((batch, batch), -math.log(dataset_size), dtype=dtype, device=device)
    weights = torch.full((batch, batch), 1.0 / (batch - 1), dtype=torch.float64)
    weights.fill_diagonal_(1.0 / dataset_size)
    rows = torch.arange(batch)
    weights[rows, (rows + 1) % batch] = (dataset_size - batch + 1) / (dataset_size * (batch - 1))
    return weights.log().to(dtype=dtype, device=device)
