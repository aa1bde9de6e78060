"""Gaussian VAE with a VampPrior (Tomczak & Welling 2018): the prior is the encoder's own
posterior at K learned pseudo-inputs u_k,

    p(z)    = (1/K) sum_k q(z | u_k),      q(z|u_k) = N(mu(u_k), diag exp(logvar(u_k)))
    log p(z) = logsumexp_k log q(z | u_k) - log K

so the prior follows the aggregate posterior instead of pulling every code towards N(0, I).
The KL(q(z|x) || p(z)) has no closed form: per example it is the Monte Carlo estimate of
``vae.losses.mc_kl`` over ``kl_samples`` reparameterised draws z_s ~ q(z|x),

    KL(x) ~ (1/S) sum_s [log q(z_s|x) - log p(z_s)]

and the reconstruction term is the mean of -log p(x|z_s) over the same draws, so that
``elbo`` = -(recon + kl) is an unbiased estimate of the ELBO, in nats per example. The logged
``kl`` is this estimate. The regulariser (beta, its schedules, capacity) applies to it as in
``GaussianVAE``; free bits needs a KL per latent dimension, which a mixture prior does not
have, so ``model.free_bits`` > 0 is refused.

The pseudo-inputs are u_k = sigmoid(a_k), a_k free parameters of the image shape: every image
of this project's DataModules lies in [0, 1], and so do the pseudo-inputs. a_k starts as N(0, 1)
noise, i.e. grey images of random pixels (each roughly in [0.1, 0.9], mean 0.5).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vae.eval.nll import reconstruction_nll_of_draws
from vae.losses import FreeBitsKL, MonteCarloKL, compute_elbo, mc_kl
from vae.models.gaussian_vae import GaussianVAE

_LOG_2PI = math.log(2.0 * math.pi)


def log_mixture_density(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log (1/K) sum_k N(z; mu_k, diag exp(logvar_k)), nats, for z (..., D) and components
    mu, logvar (K, D): shape (...). The log-sum-exp runs over all K components at once."""
    standardised_sq = (z.unsqueeze(-2) - mu).square() * torch.exp(-logvar)  # (..., K, D)
    log_components = -0.5 * (_LOG_2PI + logvar + standardised_sq).sum(-1)  # (..., K)
    return torch.logsumexp(log_components, -1) - math.log(mu.shape[0])


class VampPriorVAE(GaussianVAE):
    """The Gaussian VAE's keys (``conf/model/vampprior.yaml``) plus:

    Args:
        num_pseudo_inputs: K, the mixture components of the prior (``model.num_pseudo_inputs``;
            Tomczak & Welling use 500 for MLPs).
        kl_samples: S >= 2, draws of q(z|x) per example for the Monte Carlo KL and the
            reconstruction term (``model.kl_samples``); 2 is the fewest with a standard error.
    """

    def __init__(self, *args, num_pseudo_inputs: int = 500, kl_samples: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        for key, value, least in (
            ("num_pseudo_inputs", num_pseudo_inputs, 1),
            ("kl_samples", kl_samples, 2),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"model.{key} must be an integer >= {least}, got {value!r}")
        if self.hparams.get("free_bits", 0.0) > 0 or isinstance(self.regulariser, FreeBitsKL):
            raise ValueError(
                f"model.free_bits={self.hparams.get('free_bits')!r}: free bits needs a KL per "
                "latent dimension, which a VampPrior's mixture prior does not have; set "
                "model.free_bits=0"
            )
        self.kl_samples = kl_samples
        generator = torch.Generator().manual_seed(4321)
        self.pseudo_input_logits = nn.Parameter(
            torch.randn(num_pseudo_inputs, *self.image_shape, generator=generator)
        )
        # Fixed components for val/samples (with GaussianVAE's fixed sample_z as their noise),
        # so that the grid shows the same draws across epochs.
        self.register_buffer(
            "sample_components",
            torch.randint(num_pseudo_inputs, (self.num_images,), generator=generator),
            persistent=False,
        )

    # --- the prior ------------------------------------------------------------------------
    def pseudo_inputs(self) -> torch.Tensor:
        """u_k = sigmoid(a_k), (K, C, H, W), in the data range [0, 1]."""
        return torch.sigmoid(self.pseudo_input_logits)

    def prior_components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z|u_k) for every pseudo-input, each (K, latent_dim)."""
        return self.encode(self.pseudo_inputs())

    def prior_log_density(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) = logsumexp_k log q(z|u_k) - log K, nats, for z (..., latent_dim)."""
        return log_mixture_density(z, *self.prior_components())

    # --- the Monte Carlo terms --------------------------------------------------------------
    def draw_latents(
        self,
        mu: torch.Tensor,
        logvar: torch.Tensor,
        num_samples: int,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, log q(z|x)): num_samples reparameterised draws per example, (B, S, D) and
        (B, S) nats. At z = mu + sigma * eps q's standardised residual is eps itself, so
        log q = -1/2 sum_d (log 2 pi + logvar_d + eps_d^2) exactly, without a division."""
        eps = torch.randn(
            (mu.shape[0], num_samples, mu.shape[1]),
            generator=generator,
            device=mu.device,
            dtype=mu.dtype,
        )
        z = mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps
        log_q = -0.5 * (_LOG_2PI + logvar.unsqueeze(1) + eps.square()).sum(-1)
        return z, log_q

    def monte_carlo_kl(self, z: torch.Tensor, log_q: torch.Tensor) -> MonteCarloKL:
        """KL(q(z|x) || p(z)) per example from draws z (B, S, D) with log q (B, S): estimate and
        standard error, each (B,), nats (``vae.losses.mc_kl``)."""
        return mc_kl(log_q, self.prior_log_density(z), dim=1, validate=False)

    def compute_terms(self, x: torch.Tensor, step: int):
        mu, logvar = self.encode(x)
        z, log_q = self.draw_latents(mu, logvar, self.kl_samples)
        kl = self.monte_carlo_kl(z, log_q).estimate  # (B,) nats
        recon = reconstruction_nll_of_draws(self, self.decode(z), x).mean(1)
        # One "dimension" holding the whole KL: beta and capacity see the KL per example.
        terms = compute_elbo(recon, kl.unsqueeze(1), self.regulariser, step, validate=False)
        loss, scalars = self.loss_and_scalars(terms, mu, logvar)
        if not self.training:
            self.val_active_units.update(mu.detach())
            # MI and TC do not depend on the prior; the third term is then KL - MI - TC.
            self.val_kl_decomposition.update(mu.detach(), logvar.detach(), kl.detach())
        return loss, scalars

    def importance_sample(
        self, x: torch.Tensor, num_samples: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log w, -log p(x|z)) at num_samples fresh draws z ~ q(z|x), each (B, S), nats, with
        log w = log p(x|z) + log p(z) - log q(z|x) and p(z) the mixture (``vae.eval.nll``)."""
        mu, logvar = self.encode(x)
        z, log_q = self.draw_latents(mu, logvar, num_samples, generator)
        recon = reconstruction_nll_of_draws(self, self.decode(z), x)
        return self.prior_log_density(z) - log_q - recon, recon

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """Decoder means at z ~ p(z): a uniformly drawn component k, then z ~ q(z|u_k)."""
        mu, logvar = self.prior_components()
        if num_samples <= self.sample_z.shape[0]:  # the fixed draws of val/samples
            components, eps = self.sample_components[:num_samples], self.sample_z[:num_samples]
        else:
            components = torch.randint(mu.shape[0], (num_samples,), device=mu.device)
            eps = torch.randn(num_samples, self.latent_dim, device=mu.device, dtype=mu.dtype)
        z = mu[components] + torch.exp(0.5 * logvar[components]) * eps
        return self.likelihood.mean(self.decode(z))

    # --- statistics of the whole validation epoch ------------------------------------------
    def log_epoch_statistics(self) -> None:
        """``val/active_units`` and the KL decomposition (with the Monte Carlo KL); no
        ``val/kl_per_dim``: the mixture prior gives no KL per dimension."""
        self.log_val_epoch_scalar("active_units", self.val_active_units.compute())
        self.log_kl_decomposition(self.val_kl_decomposition)
