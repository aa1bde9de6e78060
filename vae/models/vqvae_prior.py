"""Second stage of the VQ-VAE: an autoregressive prior over the codes of a frozen VQ-VAE.

    c = codes(x) of the frozen VQ-VAE (h x w grid),   p(c) = CodePrior (causal transformer)
    loss = -log p(c)                                   nats per example

With this prior the rate of the VQ-VAE is KL(one-hot q(c|x) || p(c)) = -log p(c(x)) (logged as
``kl``), and since q is a point mass,

    log p(x) >= log p(x | c(x)) + log p(c(x)) = -(recon + kl) = elbo,

so ``val/bits_per_dim = -elbo / (pixels * ln 2)`` (plus log2 L for a density on dequantized
pixels, see ``LatentVariableModule.bits_per_dim``) is an upper bound on the bits per dimension
of the whole model (VQ-VAE decoder + prior). ``val/samples`` shows codes drawn from the prior
and decoded by the frozen decoder: real generations.

``vqvae_ckpt`` is a checkpoint of a ``model=vqvae`` run (e.g. ``<run>/checkpoints/last.ckpt``).
``vqvae_ckpt=null`` builds a randomly initialised VQ-VAE from ``vqvae`` instead: the wiring
runs (smoke tests, ``debug=fdr``) but the numbers mean nothing, and a warning says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from vae.models.base import LatentVariableModule
from vae.models.vqvae import VQVAE
from vae.nn.prior import CodePrior
from vae.training.checkpoints import CheckpointError, read_checkpoint

SAMPLE_SEED = 1234  # val/samples draws the same random stream each epoch


def load_frozen_vqvae(
    path: str, image_shape: Sequence[int], data_levels: int | None = None
) -> VQVAE:
    """The VQ-VAE of checkpoint ``path`` (``VQVAE.load_from_checkpoint``), frozen, in eval mode.

    Raises ``CheckpointError`` (a ``ValueError``) naming ``model.vqvae_ckpt`` if the file is not
    a VQ-VAE checkpoint or was trained on images of another shape or depth (``data_levels``,
    e.g. binarized against grey-level pixels).
    """
    checkpoint = read_checkpoint(path)
    saved_class = checkpoint.get("model_class")
    if saved_class != VQVAE.__qualname__:
        raise CheckpointError(
            f"model.vqvae_ckpt={path} holds a {saved_class or 'checkpoint of an older format'}, "
            "not a VQVAE; give the checkpoint of a model=vqvae run, e.g. "
            "logs/vqvae_fashion/<run>/checkpoints/last.ckpt."
        )
    hparams = checkpoint.get("hyper_parameters") or {}
    saved_shape = tuple(int(s) for s in hparams.get("image_shape", ()))
    if saved_shape != tuple(int(s) for s in image_shape):
        raise CheckpointError(
            f"model.vqvae_ckpt={path} was trained on images of shape {saved_shape}, but the data "
            f"gives {tuple(image_shape)}; use the same data=... as the VQ-VAE run."
        )
    saved_levels = hparams.get("data_levels")
    if saved_levels != data_levels:
        raise CheckpointError(
            f"model.vqvae_ckpt={path} was trained on pixels with {saved_levels} levels, but the "
            f"data gives {data_levels}; use the same data.binarize as the VQ-VAE run."
        )
    return freeze(VQVAE.load_from_checkpoint(path, map_location="cpu"))


def freeze(model: VQVAE) -> VQVAE:
    model.requires_grad_(False)
    return model.eval()


class VQVAEPrior(LatentVariableModule):
    """Trains ``CodePrior`` on the codes of a frozen VQ-VAE (``conf/model/vqvae_prior.yaml``).

    Args:
        image_shape: (C, H, W), from the data module.
        vqvae_ckpt: checkpoint of the VQ-VAE run, or None for a random VQ-VAE (smoke tests).
        vqvae: constructor arguments of that random VQ-VAE (used only when ``vqvae_ckpt`` is None).
        dim, depth, heads, dropout: the prior's transformer (``vae.nn.CodePrior``).
        temperature: softmax temperature of ``val/samples``.
    """

    guarded_terms = ("kl",)

    def __init__(
        self,
        image_shape: Sequence[int],
        vqvae_ckpt: str | None = None,
        vqvae: Mapping[str, Any] | None = None,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        dropout: float = 0.1,
        temperature: float = 1.0,
        lr: float = 1e-3,
        num_images: int = 64,
        data_levels: int | None = None,
        optimizer: Mapping[str, Any] | Callable[..., Any] | None = None,
    ):
        super().__init__(optimizer=optimizer, num_images=num_images)
        self.save_hyperparameters(logger=False)
        self.image_shape = tuple(int(s) for s in image_shape)
        if vqvae_ckpt is None:
            warnings.warn(
                "model.vqvae_ckpt is null: the prior is trained on the codes of a randomly "
                "initialised VQ-VAE, which is only useful to smoke-test the wiring. Set "
                "model.vqvae_ckpt=<vqvae run>/checkpoints/last.ckpt for real results.",
                stacklevel=2,
            )
            vqvae_args = {**dict(vqvae or {}), "data_levels": data_levels}
            self.vqvae = freeze(VQVAE(self.image_shape, **vqvae_args))
        else:
            self.vqvae = load_frozen_vqvae(str(vqvae_ckpt), self.image_shape, data_levels)
        self.prior = CodePrior(
            self.vqvae.num_codes,
            self.vqvae.grid_shape,
            dim=dim,
            depth=depth,
            heads=heads,
            dropout=dropout,
        )
        if not temperature > 0:
            raise ValueError(f"model.temperature must be > 0, got {temperature}.")
        self.temperature = float(temperature)

    def train(self, mode: bool = True):
        """The VQ-VAE stays in eval mode: its quantizer must not update the codebook."""
        super().train(mode)
        self.vqvae.eval()
        return self

    @torch.no_grad()
    def codes(self, x: torch.Tensor):
        """The frozen VQ-VAE's quantizer output for ``x`` (indices and quantized latents)."""
        return self.vqvae.quantizer(self.vqvae.encoder(x))

    def compute_terms(self, x: torch.Tensor, step: int):
        quantized = self.codes(x)
        kl = self.prior.nll(quantized.indices).mean()
        terms = {"loss": kl, "kl": kl}
        if not self.training:
            with torch.no_grad():
                params = self.vqvae.decoder(quantized.quantized)
                recon = self.vqvae.reconstruction_nll(params, x).mean()
            elbo = -(recon + kl)
            terms.update(recon=recon, elbo=elbo)
            if self.vqvae.likelihood.reports_bits_per_dim:
                terms["bits_per_dim"] = self.vqvae.bits_per_dim(-elbo)
        return kl, terms

    def train_scalar_names(self):
        return ("loss", "kl")

    def val_scalar_names(self):
        bits = ("bits_per_dim",) if self.vqvae.likelihood.reports_bits_per_dim else ()
        return ("loss", "recon", "kl", "elbo", *bits)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.vqvae.reconstruct(x)

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """Codes drawn from the prior (a fixed random stream), decoded by the frozen VQ-VAE."""
        generator = torch.Generator(device=self.device).manual_seed(SAMPLE_SEED)
        codes = self.prior.sample(num_samples, self.temperature, generator=generator)
        return self.vqvae.decode_indices(codes)
