"""Importance-weighted autoencoder (Burda, Grosse & Salakhutdinov 2016): a Gaussian VAE trained
on the k-sample bound instead of the ELBO.

For each example, k reparameterised draws z_i = mu + sigma * eps_i ~ q(z|x) and

    log w_i = log p(x|z_i) + log N(z_i; 0, I) - log q(z_i|x)
    L_k(x)  = logsumexp_i log w_i - log k        (E[L_1] = ELBO <= E[L_k] <= log p(x))
    loss    = -mean over the batch of L_k(x)

in nats per example. There is no KL regulariser: the bound has no beta to weigh (a
beta-weighted k-sample bound is not defined here), so ``model.kl_schedule`` must be constant,
``model.beta`` 1 and ``model.free_bits`` 0. The logged ``kl`` (closed form), ``recon`` (mean of
-log p(x|z_i) over the k draws) and ``elbo`` = -(recon + kl) are the Gaussian VAE's, so that
``val/elbo`` (which picks the best checkpoint) compares with every VAE; ``iw_bound`` = L_k is
the trained objective.

``model.gradient_estimator``: ``iwae`` differentiates L_k as it is; ``dreg`` (Tucker et al.
2019, "Doubly reparameterized gradient estimators") keeps the decoder's gradient
sum_i w~_i grad log w_i (w~ = softmax of the log weights) and gives the encoder
sum_i w~_i^2 (d log w_i / d z_i) (d z_i / d phi), with q's parameters held fixed inside log w:
the same expectation without the score-function term, whose variance grows with k.
"""

from __future__ import annotations

import math

import torch

from vae.eval.nll import diagonal_gaussian_log_density, standard_normal_log_density
from vae.losses import BetaKL, ConstantBeta, compute_elbo, gaussian_kl
from vae.models.gaussian_vae import GaussianVAE

GRADIENT_ESTIMATORS = ("iwae", "dreg")


def log_importance_weights(
    recon_nll: torch.Tensor, eps: torch.Tensor, z: torch.Tensor, logvar: torch.Tensor
) -> torch.Tensor:
    """log w_i = -recon_nll_i + log N(z_i; 0, I) - log N(z_i; mu, diag exp(logvar)), (B, k) nats.

    With z = mu + sigma * eps the standardised residual of q is eps itself, so (the log 2 pi
    terms cancel) log p(z) - log q(z|x) = 1/2 sum_d (eps_d^2 - z_d^2 + logvar_d), exact and
    without a division by sigma. ``recon_nll`` (B, k); ``eps``, ``z`` (B, k, D); ``logvar`` (B, D).
    """
    prior_over_posterior = 0.5 * (eps.square() - z.square()).sum(-1) + 0.5 * logvar.sum(-1, True)
    return prior_over_posterior - recon_nll


def importance_weighted_bound(log_weights: torch.Tensor) -> torch.Tensor:
    """L_k = logsumexp_i log w_i - log k per example, (B,) nats, from log weights (B, k)."""
    return torch.logsumexp(log_weights, dim=1) - math.log(log_weights.shape[1])


def dreg_surrogate(
    log_weights: torch.Tensor, z_leaf: torch.Tensor, z: torch.Tensor
) -> torch.Tensor:
    """A term of value 0 whose gradient is DReG's estimate of -grad mean_batch L_k.

    ``log_weights`` (B, k) must be computed from ``z_leaf``, a detached copy of the draws ``z``
    (B, k, D), with q's (mu, logvar) detached too: then its gradient reaches the decoder only,
    weighted by w~_i, and d log w_i / d z_i weighted by w~_i^2 is carried back to the encoder
    through ``z``, which depends on it by the reparameterisation alone.
    """
    normalised = torch.softmax(log_weights.detach(), dim=1)
    decoder_part = -(normalised * log_weights).sum(1).mean()
    (path,) = torch.autograd.grad(
        log_weights, z_leaf, grad_outputs=normalised.square(), retain_graph=True
    )
    encoder_part = -(path.detach() * z).sum((1, 2)).mean()
    surrogate = decoder_part + encoder_part
    return surrogate - surrogate.detach()


class IWAE(GaussianVAE):
    """The Gaussian VAE's keys (``conf/model/iwae.yaml``) plus ``k``.

    Args:
        k: importance samples per example in the training bound (``model.k``); k = 1 is the
            ELBO with a Monte Carlo KL. All k * B draws go through the decoder in one call.
        gradient_estimator: "iwae" or "dreg" (``model.gradient_estimator``, see above); the
            bound and every logged number are the same for both.
    """

    guarded_terms = ("recon", "kl", "iw_bound")

    def __init__(self, *args, k: int = 5, gradient_estimator: str = "iwae", **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"model.k must be a positive integer (samples per example), got {k!r}")
        self.k = k
        if gradient_estimator not in GRADIENT_ESTIMATORS:
            raise ValueError(
                f"model.gradient_estimator must be one of {', '.join(GRADIENT_ESTIMATORS)}, got "
                f"{gradient_estimator!r}"
            )
        self.gradient_estimator = gradient_estimator
        for key, plain in (("kl_schedule", "constant"), ("beta", 1.0), ("free_bits", 0.0)):
            if self.hparams.get(key, plain) != plain:
                raise ValueError(
                    f"model.{key}={self.hparams[key]!r}: IWAE trains the importance-weighted "
                    f"bound, which weighs no KL; use model.{key}={plain} (or model=vae)"
                )
        schedule = getattr(self.regulariser, "schedule", None)
        if not (
            type(self.regulariser) is BetaKL
            and isinstance(schedule, ConstantBeta)
            and schedule.beta == 1.0
        ):
            raise ValueError(
                f"model.regulariser={self.regulariser!r}: IWAE trains the k-sample bound, which "
                "has no KL regulariser; leave it the plain KL (constant, beta 1, no free bits)"
            )

    def compute_terms(self, x: torch.Tensor, step: int):
        mu, logvar = self.encode(x)
        batch, dims = mu.shape
        eps = torch.randn(batch, self.k, dims, dtype=mu.dtype, device=mu.device)
        z = mu[:, None] + torch.exp(0.5 * logvar)[:, None] * eps  # (B, k, D)
        dreg = self.gradient_estimator == "dreg" and torch.is_grad_enabled()
        decoded = z.detach().requires_grad_() if dreg else z
        params = self.decode(decoded.reshape(batch * self.k, dims))  # one call, rows (B, k)
        recon = self.reconstruction_nll(params, x.repeat_interleave(self.k, dim=0))
        recon = recon.view(batch, self.k)
        if dreg:  # log q with its parameters held fixed: only the path through z is left
            fixed_q = diagonal_gaussian_log_density(
                decoded, mu.detach()[:, None], logvar.detach()[:, None]
            )
            log_weights = standard_normal_log_density(decoded) - fixed_q - recon
        else:
            log_weights = log_importance_weights(recon, eps, z, logvar)
        iw_bound = importance_weighted_bound(log_weights)
        kl = gaussian_kl(mu, logvar, validate=False)  # (B, D) nats
        terms = compute_elbo(recon.mean(1), kl, 1.0, step, validate=False)  # reported, not trained
        loss = -iw_bound.mean()
        if dreg:
            loss = loss.detach() + dreg_surrogate(log_weights, decoded, z)
        scalars = {
            "loss": loss,
            "recon": terms.recon,
            "kl": terms.kl,
            "elbo": terms.elbo,
            "iw_bound": iw_bound.mean(),
        }
        if self.likelihood.reports_bits_per_dim:
            scalars["bits_per_dim"] = self.bits_per_dim(-terms.elbo)
        self.update_epoch_statistics(mu, logvar, kl)
        return loss, scalars

    def train_scalar_names(self):
        return ("loss", "recon", "kl", "iw_bound")

    def val_scalar_names(self):
        return (*super().val_scalar_names(), "iw_bound")
