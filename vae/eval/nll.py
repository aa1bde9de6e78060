"""Importance-weighted log-likelihood estimate of a VAE (Burda, Grosse & Salakhutdinov 2016), a
lower bound on log p(x) in expectation.

For one example x and k draws z_i ~ q(z|x), with log weights

    log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x),

the estimate is

    L_k(x) = log (1/k) sum_i w_i = logsumexp_i(log w_i) - log k,

and E[L_k(x)] <= log p(x) (Jensen: E[(1/k) sum_i w_i] = p(x) and log is concave). One draw of
L_k(x) can exceed log p(x); only its expectation cannot. So NLL_iw(k) = -L_k(x) is an
estimate whose expectation upper-bounds the NLL, -log p(x). E[L_1] is the ELBO; E[L_k] is
non-decreasing in k and tends to log p(x) as k grows when the weights are bounded (Burda et
al. 2016, Theorem 1). All numbers are nats per example.

The k samples of a whole batch go through the decoder together, ``chunk_size`` samples per
example at a time, so the decoder sees (chunk_size * B) rows per call and the activations take
chunk_size * B * (pixels) floats whatever k is (k = 5000 works on a laptop). Only the k log
weights and reconstruction terms of each example are kept (2 * B * k floats: 2.5 MB for B = 64,
k = 5000); one logsumexp in float64 over all k then gives L_k(x).

The model needs one of two protocols (any ``nn.Module`` can provide either):

1. A diagonal-Gaussian posterior and the prior N(0, I) (``GaussianVAE``): the weights and the
   KL are computed here, the KL in closed form per latent dimension.

   * ``encode(x) -> (mu, logvar)``, each (B, D): q(z|x) = N(mu, diag exp(logvar));
   * ``decode(z)`` for z of shape (B, S, D) -> decoder parameters of shape (B, S, *event);
   * ``reconstruction_nll(params, x) -> (N,)``: -log p(x|z) in nats for N = B * S flattened
     rows. A model whose likelihood dequantizes its targets draws fresh noise at every call,
     so the estimate then also integrates over the dequantization noise.

2. Any other prior or posterior (a VampPrior, a ladder of latents): the model draws and
   weighs its own samples, and this path is used whenever the method exists.

   * ``importance_sample(x, num_samples, generator) -> (log_weight, recon)``, each
     (B, num_samples), at fresh draws z_s ~ q(z|x): log_weight = log p(x, z_s) - log q(z_s|x)
     and recon = -log p(x|z_s), nats.

   The KL is then the Monte Carlo mean over the k draws of log q(z|x) - log p(z) =
   -(log_weight + recon), and there is no per-dimension KL.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from vae.losses import gaussian_kl

__all__ = [
    "ImportanceWeightedBounds",
    "default_chunk_size",
    "diagonal_gaussian_log_density",
    "importance_weighted_bounds",
    "importance_weighted_nll",
    "reconstruction_nll_of_draws",
    "standard_normal_log_density",
]

_LOG_2PI = math.log(2.0 * math.pi)
# Rows (examples x samples) per decoder call when chunk_size is not given. On a CPU, 512 rows
# keep each activation (1.6 MB at 784 pixels) small enough that the C allocator reuses freed
# memory: at 2048-3072 rows it returned it to the OS after each chunk, and page faults on the
# fresh memory cost up to a third of the run (benchmarks/bench_iw_nll.py --rows). A GPU needs far
# more rows to be busy (an H200 runs ~10x faster with 100k rows than with 2k), and 64k rows of
# 784 pixels take ~200 MB per activation.
DEFAULT_ROWS_PER_CHUNK = {"cpu": 512, "cuda": 65536}


def diagonal_gaussian_log_density(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, diag exp(logvar)) summed over the last dim, in nats.

    = -1/2 * sum_d [log 2 pi + logvar_d + (z_d - mu_d)^2 / exp(logvar_d)]
    """
    standardised_sq = (z - mu).square() * torch.exp(-logvar)
    return -0.5 * (_LOG_2PI + logvar + standardised_sq).sum(-1)


def standard_normal_log_density(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over the last dim, in nats: -1/2 * sum_d (log 2 pi + z_d^2)."""
    return -0.5 * (_LOG_2PI + z.square()).sum(-1)


class ImportanceWeightedBounds(NamedTuple):
    """Per-example results of :func:`importance_weighted_bounds`, all in nats, shape (B,) or (B, D).

    Attributes:
        nll_iw: -L_k(x), an estimate whose expectation upper-bounds the NLL, -log p(x) (one
            estimate can fall below it).
        recon: mean over the k samples of -log p(x|z_i): a k-sample estimate of the ELBO's
            reconstruction term.
        kl_per_dim: closed-form KL(q(z_d|x) || N(0, 1)) per latent dimension, (B, D); None for
            a model with its own ``importance_sample`` (no per-dimension KL exists then).
        kl: KL(q(z|x) || p(z)) per example: the sum of ``kl_per_dim`` (exact), or for a model
            with its own ``importance_sample`` the mean over the k draws of
            log q(z_i|x) - log p(z_i) (Monte Carlo).
    """

    nll_iw: Tensor
    recon: Tensor
    kl_per_dim: Tensor | None
    kl: Tensor

    @property
    def elbo(self) -> Tensor:
        """-(recon + kl): a k-sample estimate of the ELBO (Monte Carlo reconstruction; the KL
        exact or Monte Carlo, see ``kl``)."""
        return -(self.recon + self.kl)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value


def _check_model(model: object) -> None:
    if hasattr(model, "importance_sample"):
        return
    missing = [m for m in ("encode", "decode", "reconstruction_nll") if not hasattr(model, m)]
    if missing:
        raise ValueError(
            f"model must provide encode(x) -> (mu, logvar), decode(z) and "
            f"reconstruction_nll(params, x) (a Gaussian VAE), or importance_sample(x, "
            f"num_samples, generator); {type(model).__name__} lacks "
            f"{', '.join(missing)}."
        )


def default_chunk_size(batch_size: int, k: int, device: torch.device | str = "cpu") -> int:
    """Samples per example per decoder call: about 512 rows per call on a CPU, 65536 on a GPU."""
    rows = DEFAULT_ROWS_PER_CHUNK["cuda" if torch.device(device).type == "cuda" else "cpu"]
    return max(1, min(k, rows // max(1, batch_size)))


def reconstruction_nll_of_draws(model, params: Tensor, x: Tensor) -> Tensor:
    """-log p(x | z) in nats, (B, S), from params (B, S, *event) of S draws per example and the
    batch x (B, *event), through ``model.reconstruction_nll`` on B * S flattened rows."""
    batch, samples = params.shape[:2]
    targets = x.unsqueeze(1).expand(batch, samples, *x.shape[1:])
    flat = model.reconstruction_nll(
        params.reshape(batch * samples, *params.shape[2:]),
        targets.reshape(batch * samples, *x.shape[1:]),
    )
    return flat.view(batch, samples)


@torch.no_grad()
def importance_weighted_bounds(
    model,
    x: Tensor,
    k: int,
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
) -> ImportanceWeightedBounds:
    """NLL_iw(k), the k-sample reconstruction term and the KL for each example of ``x``.

    Args:
        model: a Gaussian VAE, or a model with ``importance_sample`` (see the module
            docstring for the two protocols). Its mode is left as
            it is; call ``model.eval()`` first if it has dropout or batch norm.
        x: a batch, (B, *event), on the model's device.
        k: importance samples per example (Burda et al. report k = 5000).
        chunk_size: samples per example evaluated in one decoder call; ``None`` picks about
            512 rows per call on a CPU and 65536 on a GPU (:func:`default_chunk_size`). Peak
            memory grows with chunk_size * B, not with k.
        generator: the random stream for the samples (on ``x``'s device), for reproducible
            numbers; ``None`` uses the global one.

    Returns:
        :class:`ImportanceWeightedBounds` with (B,) tensors (and (B, D) ``kl_per_dim``, or None
        for a model with its own ``importance_sample``), in the model's dtype.
    """
    _check_model(model)
    k = _positive_int("k", k)
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch tensor (B, ...), got {type(x).__name__}.")
    batch = x.shape[0]
    chunk_size = default_chunk_size(batch, k, x.device) if chunk_size is None else chunk_size
    chunk_size = _positive_int("chunk_size", chunk_size)

    if hasattr(model, "importance_sample"):
        return _model_importance_weighted_bounds(model, x, k, chunk_size, generator)
    mu, logvar = model.encode(x)
    mu, std = mu.unsqueeze(1), torch.exp(0.5 * logvar).unsqueeze(1)  # (B, 1, D)
    # log w = log p(x|z) + log p(z) - log q(z|x). At z = mu + std * eps, q's standardised
    # residual is eps itself, so (the log 2 pi terms cancel)
    #   log p(z) - log q(z|x) = 1/2 sum_d (eps_d^2 - z_d^2) + 1/2 sum_d logvar_d,
    # exact, with no division by std.
    half_sum_logvar = 0.5 * logvar.sum(-1, keepdim=True)  # (B, 1)

    # All k log weights and reconstruction terms are kept (B * k floats each), and reduced once.
    log_w = torch.empty(batch, k, dtype=mu.dtype, device=x.device)
    recon = torch.empty(batch, k, dtype=mu.dtype, device=x.device)
    for start in range(0, k, chunk_size):
        stop = min(start + chunk_size, k)
        # Samples are laid out (B, S, ...) so that each example's S rows are contiguous.
        eps = torch.randn(
            (batch, stop - start, mu.shape[-1]),
            generator=generator,
            device=x.device,
            dtype=mu.dtype,
        )
        z = mu + std * eps
        chunk_recon = reconstruction_nll_of_draws(model, model.decode(z), x)
        prior_ratio = (eps.square() - z.square()).sum(-1)  # sum_d eps^2 - z^2, (B, S)
        recon[:, start:stop] = chunk_recon
        log_w[:, start:stop] = half_sum_logvar - chunk_recon + 0.5 * prior_ratio

    nll_iw = math.log(k) - torch.logsumexp(log_w.double(), 1)
    mu = mu.squeeze(1)
    kl_per_dim = gaussian_kl(mu, logvar, validate=False)
    return ImportanceWeightedBounds(
        nll_iw=nll_iw.to(mu.dtype),
        recon=recon.sum(1, dtype=torch.float64).div_(k).to(mu.dtype),
        kl_per_dim=kl_per_dim,
        kl=kl_per_dim.sum(-1),
    )


def _model_importance_weighted_bounds(
    model, x: Tensor, k: int, chunk_size: int, generator: torch.Generator | None
) -> ImportanceWeightedBounds:
    """Protocol 2 of the module docstring: the model's own ``importance_sample``, chunk by chunk.

    KL per example = mean_i [log q(z_i|x) - log p(z_i)] = -mean_i (log w_i + recon_i), in
    float64 like the reconstruction term.
    """
    log_w, recon = [], []
    for start in range(0, k, chunk_size):
        samples = min(chunk_size, k - start)
        chunk_log_w, chunk_recon = model.importance_sample(x, samples, generator)
        if chunk_log_w.shape != (x.shape[0], samples) or chunk_recon.shape != chunk_log_w.shape:
            raise ValueError(
                f"{type(model).__name__}.importance_sample must return (log_weight, recon) of "
                f"shape (batch, num_samples) = {(x.shape[0], samples)} each; got "
                f"{tuple(chunk_log_w.shape)} and {tuple(chunk_recon.shape)}."
            )
        log_w.append(chunk_log_w)
        recon.append(chunk_recon)
    log_w, recon = torch.cat(log_w, 1), torch.cat(recon, 1)
    dtype = log_w.dtype
    nll_iw = math.log(k) - torch.logsumexp(log_w.double(), 1)
    mean_recon = recon.sum(1, dtype=torch.float64).div_(k)
    kl = -(log_w.sum(1, dtype=torch.float64).div_(k) + mean_recon)
    return ImportanceWeightedBounds(
        nll_iw=nll_iw.to(dtype), recon=mean_recon.to(dtype), kl_per_dim=None, kl=kl.to(dtype)
    )


def importance_weighted_nll(
    model,
    x: Tensor,
    k: int,
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """-log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x): shape (B,), nats per example.

    A plain function (no Lightning); see :func:`importance_weighted_bounds` for the arguments.
    """
    return importance_weighted_bounds(model, x, k, chunk_size, generator).nll_iw
