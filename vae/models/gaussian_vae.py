"""Gaussian VAE (Kingma & Welling 2014) with a closed-form KL term.

    q(z|x) = N(mu(x), diag exp(logvar(x))),   p(z) = N(0, I),   p(x|z) from ``likelihood``.
    ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z))          (one reparameterised sample)
    loss    = recon + regulariser(KL, step)                  (recon = -log p(x|z))

All terms are nats per example. The ELBO is computed once, in ``vae.losses.compute_elbo``; the
KL regulariser (constant beta, warm-up, cyclical, capacity, free bits) is a part, like the
encoder and the decoder: a variant that only changes the penalty, the prior or the objective
subclasses this and overrides ``compute_terms`` or passes another part.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torchmetrics import Metric

from vae.eval.epoch_statistics import ActiveUnits, KLDecompositionMetric, KLPerDimension
from vae.losses import ELBOTerms, PixelLikelihood, compute_elbo, gaussian_kl, kl_regulariser
from vae.models.base import LatentVariableModule, build_part
from vae.nn import set_output_bias
from vae.training import tags
from vae.training.tensorboard import bar_chart, log_image

Part = Mapping[str, Any] | Callable[..., Any]


class GaussianVAE(LatentVariableModule):
    """Config keys (``conf/model/vae.yaml``) are the constructor arguments.

    Args:
        image_shape: (C, H, W), from the DataModule.
        encoder: ``encoder(input_shape=...)`` -> a module mapping x to (mu, logvar); a config
            with ``_target_`` (e.g. ``vae.nn.build_encoder``) or a factory. None: built from
            ``arch``, ``hidden_dims``, ``latent_dim`` and ``logvar_clamp``.
        decoder: ``decoder(output_shape=...)`` -> a module mapping z to the likelihood's
            parameters; None: built from the same keys.
        regulariser: the KL penalty (``vae.losses.KLRegulariser``) or its config; None: built
            from ``kl_schedule``, ``beta`` and ``free_bits`` by ``vae.losses.kl_regulariser``.
        latent_dim: D, the size of z.
        likelihood, sigma, learn_sigma, num_mixtures: see ``vae.losses.PixelLikelihood``;
            the decoder outputs ``params_per_channel`` channels per image channel (2 for
            ``discretized_logistic`` / ``discretized_gaussian``, 3 * num_mixtures for
            ``discretized_logistic_mixture``, else 1).
        data_levels: distinct pixel values of the data (the DataModule's ``num_levels``);
            the discretised likelihoods have one bin per level and need it.
        arch, hidden_dims, logvar_clamp, kl_schedule, beta, free_bits: shorthands for the parts
            above, used when a part is not given (the Hydra config interpolates them into the
            parts, so ``model.beta=4`` works from the command line).
        init_output_bias: at the start of training, set the decoder's output bias to the
            parameters of the training split's mean image (``PixelLikelihood.params_for_mean``:
            the logit of each pixel's mean for Bernoulli; for a discretised likelihood the
            locations at the mean and the log scales at ``PixelLikelihood.INITIAL_LOG_SCALE``),
            as Burda et al.'s IWAE code does, so that the first steps learn structure instead
            of the average image. A resumed run keeps its checkpoint's bias.
        lr: read by the optimizer's config; kept here so that it is saved with the run.
        lr_schedule: ``constant`` or ``cosine`` (to 0 over the run); see
            ``LatentVariableModule``.
    """

    guarded_terms = ("recon", "kl")

    def __init__(
        self,
        image_shape: Sequence[int],
        encoder: Part | None = None,
        decoder: Part | None = None,
        regulariser: Part | None = None,
        latent_dim: int = 8,
        likelihood: str = "bernoulli",
        sigma: float = 1.0,
        learn_sigma: bool = False,
        data_levels: int | None = None,
        num_mixtures: int = 5,
        arch: str = "mlp",
        hidden_dims: Sequence[int] = (256, 128),
        logvar_clamp: Sequence[float] | None = None,
        kl_schedule: str = "constant",
        beta: float = 1.0,
        free_bits: float = 0.0,
        init_output_bias: bool = True,
        lr: float = 1e-3,
        lr_schedule: str = "constant",
        num_images: int = 64,
        optimizer: Part | None = None,
    ):
        super().__init__(optimizer=optimizer, num_images=num_images, lr_schedule=lr_schedule)
        self.save_hyperparameters(logger=False)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.latent_dim = int(latent_dim)
        net = {"arch": arch, "hidden_dims": list(hidden_dims), "latent_dim": latent_dim}
        self.encoder = build_part(
            encoder or {"_target_": "vae.nn.build_encoder", **net, "logvar_clamp": logvar_clamp},
            input_shape=self.image_shape,
        )
        # Built first for its parameter count, registered after the decoder and the regulariser
        # as before, so that parameters (and the optimizer state of checkpoints) keep their order.
        pixel_likelihood = PixelLikelihood(
            likelihood,
            num_dims=math.prod(self.image_shape),
            channels=self.image_shape[0],
            sigma=sigma,
            learn_sigma=learn_sigma,
            data_levels=data_levels,
            num_mixtures=num_mixtures,
        )
        # The decoder outputs the likelihood's parameters: P per image channel (1 for
        # Bernoulli/Gaussian/Laplace, 2 or 3K for the discretised ones), parameter-major.
        channels, *spatial = self.image_shape
        self.decoder = build_part(
            decoder or {"_target_": "vae.nn.build_decoder", **net},
            output_shape=(pixel_likelihood.params_per_channel * channels, *spatial),
        )
        if regulariser is None:
            regulariser = kl_regulariser(kl_schedule, beta=beta, free_bits=free_bits)
        elif isinstance(regulariser, Mapping):
            regulariser = build_part(regulariser)
        self.regulariser = regulariser
        self.likelihood = pixel_likelihood
        # Fixed prior draws, so that val/samples shows the same z across epochs.
        generator = torch.Generator().manual_seed(1234)
        self.register_buffer(
            "sample_z", torch.randn(num_images, latent_dim, generator=generator), persistent=False
        )
        self.val_active_units = ActiveUnits(self.latent_dim)
        self.val_kl_per_dim = KLPerDimension(self.latent_dim)
        self.val_kl_decomposition = KLDecompositionMetric(self.latent_dim)

    def setup(self, stage: str) -> None:
        """``init_output_bias`` (see the class docstring). Lightning calls this after the
        DataModule's setup and before it restores a checkpoint, which then overwrites it."""
        split = getattr(getattr(self.trainer, "datamodule", None), "train_split", None)
        if stage == "fit" and self.hparams.init_output_bias and split is not None:
            mean_image = split.images.float().mean(0).to(self.device)
            set_output_bias(self.decoder, self.likelihood.params_for_mean(mean_image))

    # --- the model ------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z|x), each (B, latent_dim)."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood's parameters, (B, P * C, H, W): Bernoulli logits, the Gaussian/Laplace
        location, or a discretised likelihood's parameters (``PixelLikelihood``)."""
        return self.decoder(z)

    def reconstruction_nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """-log p(x | z) in nats per example, shape (B,)."""
        return self.likelihood(params, x)

    def bits_per_dim(self, nll: torch.Tensor | float) -> torch.Tensor | float | None:
        """``nll`` as bits/dim comparable with papers, or None (``PixelLikelihood``)."""
        return self.likelihood.bits_per_dim(nll)

    @staticmethod
    def reparameterise(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I): a sample of q(z|x) differentiable in (mu, logvar)."""
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def compute_terms(self, x: torch.Tensor, step: int):
        mu, logvar = self.encode(x)
        params = self.decode(self.reparameterise(mu, logvar))
        kl = gaussian_kl(mu, logvar, validate=False)  # (B, D) nats
        recon = self.reconstruction_nll(params, x)
        terms = compute_elbo(recon, kl, self.regulariser, step, validate=False)
        loss, scalars = self.loss_and_scalars(terms, mu, logvar)
        self.update_epoch_statistics(mu, logvar, kl)
        return loss, scalars

    def loss_and_scalars(
        self, terms: ELBOTerms, mu: torch.Tensor, logvar: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss (the ELBO terms' loss plus ``penalties``) and the scalars a Gaussian VAE
        logs: loss, recon, kl, beta, elbo, the penalties and, where defined, bits/dim."""
        penalties = self.penalties(mu, logvar)
        loss = terms.loss + sum(penalties.values()) if penalties else terms.loss
        scalars = {
            "loss": loss,
            "recon": terms.recon,
            "kl": terms.kl,
            "beta": terms.beta,
            "elbo": terms.elbo,
            **penalties,
        }
        if self.likelihood.reports_bits_per_dim:
            scalars["bits_per_dim"] = self.bits_per_dim(-terms.elbo)
        return loss, scalars

    def update_epoch_statistics(
        self, mu: torch.Tensor, logvar: torch.Tensor, kl: torch.Tensor
    ) -> None:
        """Feed a validation batch's posteriors and per-dimension KL (B, D) to the epoch's
        statistics (active units, KL per dimension, the KL decomposition); nothing in training."""
        if not self.training:
            self.val_active_units.update(mu.detach())
            self.val_kl_per_dim.update(kl.detach())
            self.val_kl_decomposition.update(mu.detach(), logvar.detach())

    def penalties(self, mu: torch.Tensor, logvar: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra terms added to the loss (never to the ELBO), by name, in nats per example;
        none here. A variant overrides this, and lists the names in its scalar names."""
        return {}

    def train_scalar_names(self):
        return ("loss", "recon", "kl", "beta")

    def val_scalar_names(self):
        bits = ("bits_per_dim",) if self.likelihood.reports_bits_per_dim else ()
        return ("loss", "recon", "kl", "elbo", *bits)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.likelihood.mean(self.decode(self.encode(x)[0]))

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        z = self.sample_z[:num_samples]
        if z.shape[0] < num_samples:
            z = torch.randn(num_samples, self.latent_dim, device=self.device)
        return self.likelihood.mean(self.decode(z))

    def log_kl_per_dim_chart(self, kl_per_dim: torch.Tensor) -> None:
        """``val/kl_per_dim_chart``: one bar per latent dimension, in dimension order, so that
        which dimension carries the KL (and which collapsed to the prior) stays visible, epoch
        by epoch; the histogram ``val/kl_per_dim`` keeps only the values."""
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            chart = bar_chart(
                kl_per_dim,
                xlabel="latent dimension",
                ylabel="KL (nats per example)",
                title=f"sum over dimensions: {float(kl_per_dim.sum()):.4g} nats",
            )
            log_image(self.loggers, tags.VAL_KL_PER_DIM_CHART, chart, self.global_step)

    # --- statistics of the whole validation epoch (torchmetrics: synced across processes) ---
    def log_epoch_statistics(self) -> None:
        """``val/active_units``, the per-dimension KL (histogram and chart) and the KL
        decomposition of the epoch just validated. A variant whose KL has no per-dimension form
        (a mixture prior, a hierarchy) overrides this and logs what it has."""
        self.log_val_epoch_scalar("active_units", self.val_active_units.compute())
        kl_per_dim = self.val_kl_per_dim.compute()
        self.log_val_histogram("kl_per_dim", kl_per_dim)
        self.log_kl_per_dim_chart(kl_per_dim)
        self.log_kl_decomposition(self.val_kl_decomposition)

    def on_validation_epoch_end(self) -> None:
        if self.val_active_units.update_called:
            self.log_epoch_statistics()
        for module in self.modules():  # every torchmetrics Metric here is an epoch statistic
            if isinstance(module, Metric):
                module.reset()
        super().on_validation_epoch_end()
