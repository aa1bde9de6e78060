"""Gaussian VAE (Kingma & Welling 2014) with a closed-form KL term.

    q(z|x) = N(mu(x), diag exp(logvar(x))),   p(z) = N(0, I),   p(x|z) from ``likelihood``.
    ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z))          (one reparameterised sample)
    loss    = recon + regulariser(KL)                        (recon = -log p(x|z))

All terms are nats per example. The KL regulariser (constant beta, warm-up, cyclical,
capacity, free bits) comes from ``vae.losses.build_regulariser``; the ELBO itself is computed
once, in ``vae.losses.compute_elbo``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from vae.eval.active_units import PosteriorMeanStatistics, count_active_units
from vae.losses import (
    BetaKL,
    CapacityKL,
    CapacitySchedule,
    ConstantBeta,
    CyclicalBeta,
    FreeBitsKL,
    LinearWarmup,
    compute_elbo,
    gaussian_kl,
)
from vae.models.base import LatentVariableModule
from vae.nn import build_decoder, build_encoder


def kl_regulariser(
    kl_schedule: str,
    beta: float,
    warmup_steps: int,
    cycle_steps: int,
    cycle_ratio: float,
    capacity_max: float,
    capacity_steps: int,
    capacity_gamma: float,
    free_bits: float,
):
    """The KL regulariser named by the flat ``model.*`` config keys.

    ``constant`` / ``linear`` / ``cyclical`` give beta(t); ``free_bits > 0`` applies that beta to
    max(lambda, KL_j) per dimension instead of KL; ``capacity`` replaces beta * KL by
    gamma * |KL - C(t)| and cannot be combined with free bits.
    """
    if kl_schedule == "capacity":
        if free_bits > 0:
            raise ValueError(
                "model.free_bits > 0 cannot be combined with model.kl_schedule=capacity; "
                "set one of them"
            )
        return CapacityKL(
            capacity_gamma, CapacitySchedule(c_max=capacity_max, steps=capacity_steps)
        )
    schedules = {
        "constant": lambda: ConstantBeta(beta=beta),
        "linear": lambda: LinearWarmup(beta=beta, warmup_steps=warmup_steps),
        "cyclical": lambda: CyclicalBeta(beta=beta, cycle_steps=cycle_steps, ratio=cycle_ratio),
    }
    if kl_schedule not in schedules:
        raise ValueError(
            f"model.kl_schedule must be one of {[*schedules, 'capacity']}, got {kl_schedule!r}"
        )
    schedule = schedules[kl_schedule]()
    return FreeBitsKL(free_bits, schedule) if free_bits > 0 else BetaKL(schedule)


class GaussianVAE(LatentVariableModule):
    guarded_terms = ("recon", "kl")

    def __init__(
        self,
        image_shape: Sequence[int],
        arch: str = "mlp",
        hidden_dims: Sequence[int] = (256, 128),
        latent_dim: int = 8,
        likelihood: str = "bernoulli",
        learn_sigma: bool = False,
        sigma: float = 1.0,
        logvar_clamp: Sequence[float] | None = None,
        lr: float = 1e-3,
        beta: float = 1.0,
        kl_schedule: str = "constant",
        warmup_steps: int = 1000,
        cycle_steps: int = 1000,
        cycle_ratio: float = 0.5,
        capacity_max: float = 25.0,
        capacity_steps: int = 10000,
        capacity_gamma: float = 1000.0,
        free_bits: float = 0.0,
        num_images: int = 64,
        data_levels: int | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
    ):
        super().__init__(optimizer=optimizer, num_images=num_images)
        self.save_hyperparameters(ignore=["optimizer"], logger=False)
        if not sigma > 0:
            raise ValueError(f"model.sigma must be > 0, got {sigma}.")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.latent_dim = int(latent_dim)
        self.encoder = build_encoder(
            arch, self.image_shape, hidden_dims, latent_dim, logvar_clamp=logvar_clamp
        )
        self.decoder = build_decoder(arch, latent_dim, hidden_dims, self.image_shape)
        log_sigma = torch.full((self.image_shape[0], 1, 1), math.log(sigma))
        if learn_sigma:
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)
        self.num_pixels = math.prod(self.image_shape)
        self.set_likelihood(likelihood, self.log_sigma, data_levels)
        self.regulariser = kl_regulariser(
            kl_schedule,
            beta=beta,
            warmup_steps=warmup_steps,
            cycle_steps=cycle_steps,
            cycle_ratio=cycle_ratio,
            capacity_max=capacity_max,
            capacity_steps=capacity_steps,
            capacity_gamma=capacity_gamma,
            free_bits=free_bits,
        )
        # Fixed prior draws, so that val/samples shows the same z across epochs.
        generator = torch.Generator().manual_seed(1234)
        self.register_buffer(
            "sample_z", torch.randn(num_images, latent_dim, generator=generator), persistent=False
        )
        self._reset_validation_stats()

    # --- the model ------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z|x), each (B, latent_dim)."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor, buffers: dict | None = None) -> torch.Tensor:
        """Raw decoder outputs: Bernoulli logits or the Gaussian/Laplace location.

        ``buffers`` (a dict the caller keeps between calls) lets an MLP decoder reuse its
        layer outputs without autograd (``MLPDecoder.forward_into``); the result is then
        overwritten by the next call. Other decoders ignore it.
        """
        if buffers is not None and hasattr(self.decoder, "forward_into"):
            return self.decoder.forward_into(z, buffers)
        return self.decoder(z)

    @staticmethod
    def reparameterise(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I): a sample of q(z|x) differentiable in (mu, logvar)."""
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def forward(self, x: torch.Tensor):
        mu, logvar = self.encode(x)
        z = self.reparameterise(mu, logvar)
        return self.decode(z), mu, logvar

    def compute_terms(self, x: torch.Tensor, step: int):
        params, mu, logvar = self(x)
        recon_nll = self.reconstruction_nll(params, x)
        kl = gaussian_kl(mu, logvar, validate=False)
        terms = compute_elbo(recon_nll, kl, self.regulariser, step, validate=False)
        if not self.training:
            self._accumulate_validation_stats(mu, terms.kl_per_dim)
        scalars = {
            "loss": terms.loss,
            "recon": terms.recon,
            "kl": terms.kl,
            "beta": terms.beta,
            "elbo": terms.elbo,
        }
        if self.reports_bits_per_dim:
            scalars["bits_per_dim"] = self.bits_per_dim(-terms.elbo)
        return terms.loss, scalars

    def train_scalar_names(self):
        return ("loss", "recon", "kl", "beta")

    def val_scalar_names(self):
        bits = ("bits_per_dim",) if self.reports_bits_per_dim else ()
        return ("loss", "recon", "kl", "elbo", *bits)

    def hparam_metric_tags(self):
        return (*super().hparam_metric_tags(), "val/active_units")

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        mu, _ = self.encode(x)
        return self.decoder_mean(self.decode(mu))

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        z = self.sample_z[:num_samples]
        if z.shape[0] < num_samples:
            z = torch.randn(num_samples, self.latent_dim, device=self.device)
        return self.decoder_mean(self.decode(z))

    # --- per-epoch validation statistics --------------------------------------------------
    def _reset_validation_stats(self) -> None:
        self._val_mu = PosteriorMeanStatistics()  # E_q[z] over the epoch, for active units
        self._val_kl_sum: torch.Tensor | None = None  # (D,) KL summed over the epoch's examples

    def _accumulate_validation_stats(self, mu: torch.Tensor, kl_per_dim: torch.Tensor) -> None:
        """Running sums over the epoch; ``kl_per_dim`` is this batch's mean KL per dimension."""
        self._val_mu.update(mu)
        kl_sum = kl_per_dim.detach().double() * mu.shape[0]
        self._val_kl_sum = kl_sum if self._val_kl_sum is None else self._val_kl_sum + kl_sum

    def validation_statistics(self) -> dict[str, torch.Tensor] | None:
        """Per-dimension KL (nats, mean over the epoch) and Var_x(E_q[z_d]), summed over ranks."""
        if self._val_kl_sum is None:
            return None
        kl_sum = self._val_kl_sum
        if self._trainer is not None and self.trainer.world_size > 1:

            def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
                return self.trainer.strategy.reduce(tensor, reduce_op="sum")

            self._val_mu.reduce(sum_over_processes)
            kl_sum = sum_over_processes(kl_sum)
        return {"kl_per_dim": kl_sum / self._val_mu.count, "mu_variance": self._val_mu.variance}

    def on_validation_epoch_start(self) -> None:
        self._reset_validation_stats()

    def on_validation_epoch_end(self) -> None:
        stats = self.validation_statistics()
        if stats is not None:
            self.log_val_epoch_scalar("active_units", count_active_units(stats["mu_variance"]))
            self.log_val_histogram("kl_per_dim", stats["kl_per_dim"])
        self._reset_validation_stats()
        super().on_validation_epoch_end()

    # --- KL schedule state travels with the checkpoint ---------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["kl_regulariser"] = self.regulariser.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "kl_regulariser" in checkpoint:
            self.regulariser.load_state_dict(checkpoint["kl_regulariser"])
