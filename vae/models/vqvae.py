"""VQ-VAE (van den Oord et al. 2017): conv encoder, quantizer, conv decoder.

    z_e = encoder(x)             (B, D, h, w), continuous
    e   = quantize(z_e)          one of K codes at each of the h*w positions
    loss = recon + vq_loss,  recon = -log p(x | e),  vq_loss = codebook + beta * commitment

recon is in nats per example; vq_loss in squared latent units per example (``vae.losses.vq``).
The quantizer is injected (``conf/model/quantizer/``): ``vae.nn.VectorQuantizer`` (nearest of K
learned codes) or ``vae.nn.FiniteScalarQuantizer`` (FSQ: each of D bounded channels rounded to
L_i levels, K = prod L_i implicit codes, vq_loss = 0). Either returns a ``QuantizerOutput`` with
the code indices, and K and D are read from it, so everything below is the same for both.
With a uniform prior over the codes the KL term of the ELBO is a constant, the rate
h * w * log K nats (``train/kl``, ``val/kl``), so ``val/elbo = -(recon + kl)`` and
``val/bits_per_dim`` put this model on the same axes as the Gaussian VAE. A learned prior over
the codes (``vae.models.VQVAEPrior``, the second stage) replaces log K by -log p(codes) and
gives the samples; this stage alone has no prior worth sampling, so ``sample`` returns None.

``val/perplexity`` and ``val/codebook_usage`` come from one code histogram accumulated over
the whole validation epoch (and summed over processes), never from a single batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from vae.eval.epoch_statistics import CodeUsage
from vae.losses import PixelLikelihood, uniform_prior_rate
from vae.models.base import LatentVariableModule, build_part
from vae.nn import VQDecoder, VQEncoder
from vae.training import tags
from vae.training.tensorboard import bar_chart, log_image


def resolve_code_dim(code_dim: int | None, latent_dim: int | None) -> int:
    """The code size from ``model.code_dim`` and its alias ``model.latent_dim``.

    ``latent_dim`` is accepted so that the key shared by every model works for the VQ-VAE
    too; it means the size of each code. Either may be given (the other left null), or both
    if they agree.
    """
    if code_dim is None and latent_dim is None:
        raise ValueError("model.code_dim (or its alias model.latent_dim) must be set, e.g. 64.")
    if code_dim is not None and latent_dim is not None and int(code_dim) != int(latent_dim):
        raise ValueError(
            f"model.latent_dim={latent_dim} and model.code_dim={code_dim} disagree. For the "
            "VQ-VAE latent_dim is an alias of code_dim (the size of each code): set only one."
        )
    return int(code_dim if code_dim is not None else latent_dim)


def code_histogram_image(counts: torch.Tensor) -> torch.Tensor:
    """(3, H, W) chart of the code histogram: one bar per code, most used left, uses on a log
    axis (one code usually dominates, the background of the images, and on a linear axis every
    other bar would be a sliver). An unused code has no bar, so the empty right end is the
    unused part of the codebook; the title counts the codes used."""
    counts = counts.detach().double().cpu().sort(descending=True).values
    return bar_chart(
        counts,
        xlabel="codes, sorted by use",
        ylabel="uses in the epoch",
        title=f"{int((counts > 0).sum())} of {len(counts)} codes used",
        log_scale=True,
    )


class VQVAE(LatentVariableModule):
    """The VQ-VAE. Config keys (``conf/model/vqvae.yaml``) are the constructor arguments.

    Args:
        image_shape: (C, H, W), from the data module.
        arch: only ``"conv"``: the quantizer works on a spatial grid of codes.
        hidden_dims: channels of the stride-2 convs, encoder order (the decoder mirrors them).
        code_dim / latent_dim: D, the size of each code (``latent_dim`` is an alias).
        num_codes: K.
        commitment: beta on the commitment term.
        ema, decay, eps, dead_code_threshold, restart_dead_codes, kmeans_init, kmeans_iters:
            see ``vae.nn.VectorQuantizer``; used when ``quantizer`` is not given.
        quantizer: ``quantizer(code_dim=...)`` -> the quantizer module, as a config with
            ``_target_`` or a factory: ``conf/model/quantizer/vq.yaml`` (interpolates the keys
            above) or ``fsq.yaml`` (``vae.nn.FiniteScalarQuantizer``, which checks that
            code_dim = len(levels)). None: a ``VectorQuantizer`` from the keys above.
        num_res_blocks, res_hidden: the residual stacks of encoder and decoder.
        likelihood: ``bernoulli`` (logits), ``gaussian`` / ``laplace`` (location, fixed scale
            ``sigma``) or a discretised likelihood of the L-level pixels (``vae.losses``;
            ``num_mixtures`` components for the logistic mixture); the decoder outputs
            ``PixelLikelihood.params_per_channel`` channels per image channel.
        data_levels: distinct pixel values of the data (the DataModule's ``num_levels``), set
            by the entry point; see ``LatentVariableModule.set_likelihood``.
    """

    guarded_terms = ("recon", "vq_loss")

    def __init__(
        self,
        image_shape: Sequence[int],
        arch: str = "conv",
        hidden_dims: Sequence[int] = (32, 64),
        code_dim: int | None = 64,
        latent_dim: int | None = None,
        num_codes: int = 512,
        commitment: float = 0.25,
        ema: bool = True,
        decay: float = 0.99,
        eps: float = 1e-5,
        dead_code_threshold: int | None = 100,
        restart_dead_codes: bool = True,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        num_res_blocks: int = 2,
        res_hidden: int = 32,
        likelihood: str = "bernoulli",
        sigma: float = 1.0,
        num_mixtures: int = 5,
        lr: float = 1e-3,
        num_images: int = 64,
        data_levels: int | None = None,
        quantizer: Mapping[str, Any] | Callable[..., Any] | None = None,
        optimizer: Mapping[str, Any] | Callable[..., Any] | None = None,
    ):
        super().__init__(optimizer=optimizer, num_images=num_images)
        self.save_hyperparameters(logger=False)
        if arch != "conv":
            raise ValueError(
                f"model.arch={arch!r} is not supported by the VQ-VAE: it quantizes a spatial grid "
                "of codes, which only the conv encoder makes. Use model.arch=conv."
            )
        self.image_shape = tuple(int(s) for s in image_shape)
        self.code_dim = resolve_code_dim(code_dim, latent_dim)
        self.encoder = VQEncoder(
            self.image_shape, hidden_dims, self.code_dim, num_res_blocks, res_hidden
        )
        self.likelihood = PixelLikelihood(
            likelihood,
            num_dims=math.prod(self.image_shape),
            channels=self.image_shape[0],
            sigma=sigma,
            data_levels=data_levels,
            num_mixtures=num_mixtures,
        )
        channels, height, width = self.image_shape  # the decoder outputs the likelihood's params
        output_shape = (self.likelihood.params_per_channel * channels, height, width)
        self.decoder = VQDecoder(
            self.code_dim, hidden_dims, output_shape, num_res_blocks, res_hidden
        )
        default_quantizer = {
            "_target_": "vae.nn.VectorQuantizer",
            "num_codes": num_codes,
            "commitment": commitment,
            "ema": ema,
            "decay": decay,
            "eps": eps,
            "dead_code_threshold": dead_code_threshold,
            "restart_dead_codes": restart_dead_codes,
            "kmeans_init": kmeans_init,
            "kmeans_iters": kmeans_iters,
        }
        self.quantizer = build_part(quantizer or default_quantizer, code_dim=self.code_dim)
        self.grid_shape = self.encoder.grid_shape
        self.num_codes = self.quantizer.num_codes  # K: the histogram's bins, the prior's vocabulary
        self.rate = uniform_prior_rate(math.prod(self.grid_shape), self.num_codes)
        self.val_code_usage = CodeUsage(self.num_codes)

    # --- the model ---------------------------------------------------------------------------
    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        """The code grid (B, h, w) of ``x``: the index of the chosen code at each position."""
        return self.quantizer(self.encoder(x)).indices

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Images (decoder means, data range) from a code grid (B, h, w)."""
        return self.decoder_mean(self.decoder(self.quantizer.lookup(indices)))

    def reconstruction_nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """-log p(x | e) in nats per example, shape (B,); computed in float32."""
        return self.likelihood(params, x)

    def decoder_mean(self, params: torch.Tensor) -> torch.Tensor:
        """E[x | e] for display."""
        return self.likelihood.mean(params)

    def bits_per_dim(self, nll: torch.Tensor | float) -> torch.Tensor | float | None:
        """``nll`` as bits/dim comparable with papers, or None (``PixelLikelihood``)."""
        return self.likelihood.bits_per_dim(nll)

    def forward(self, x: torch.Tensor):
        """(decoder outputs, quantizer output) for images ``x``."""
        quantized = self.quantizer(self.encoder(x))
        return self.decoder(quantized.quantized), quantized

    def compute_terms(self, x: torch.Tensor, step: int):
        params, quantized = self(x)
        recon = self.reconstruction_nll(params, x).mean()
        loss = recon + quantized.loss
        kl = torch.tensor(self.rate, device=recon.device)
        elbo = -(recon + kl)
        terms = {
            "loss": loss,
            "recon": recon,
            "vq_loss": quantized.loss,
            "commitment": quantized.commitment_loss,
            "perplexity": quantized.perplexity,
            "dead_codes": quantized.dead_codes.float(),  # counts; self.log reduces floats
            "restarted_codes": self.quantizer.num_restarted.float(),
            "kl": kl,
            "elbo": elbo,
        }
        if self.likelihood.reports_bits_per_dim:
            terms["bits_per_dim"] = self.bits_per_dim(-elbo)
        if not self.training:
            terms["mse"] = (self.decoder_mean(params.detach().float()) - x).pow(2).mean()
            self.val_code_usage.update(quantized.indices)
        return loss, terms

    def train_scalar_names(self):
        return (
            "loss",
            "recon",
            "vq_loss",
            "commitment",
            "perplexity",
            "dead_codes",
            "restarted_codes",
            "kl",
        )

    def val_scalar_names(self):
        bits = ("bits_per_dim",) if self.likelihood.reports_bits_per_dim else ()
        return ("loss", "recon", "kl", "elbo", *bits, "mse")

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        params, _ = self(x)
        return self.decoder_mean(params)

    def sample(self, num_samples: int) -> torch.Tensor | None:
        """None: the uniform prior of this stage gives noise; train ``VQVAEPrior`` for samples."""
        return None

    # --- the code histogram of the whole validation epoch (torchmetrics: synced) ------------
    def on_validation_epoch_end(self) -> None:
        if self.val_code_usage.update_called:
            counts, code_perplexity, usage = self.val_code_usage.compute()
            self.log_val_epoch_scalar("perplexity", code_perplexity)
            self.log_val_epoch_scalar("codebook_usage", usage)
            if self.trainer.is_global_zero and not self.trainer.sanity_checking:
                chart = code_histogram_image(counts)
                log_image(self.loggers, tags.VAL_CODE_HISTOGRAM, chart, self.global_step)
        self.val_code_usage.reset()
        super().on_validation_epoch_end()
