"""``model=text_vae``: a sentence VAE (Bowman et al. 2016) on a word vocabulary.

    q(z|w) = N(mu(w), diag exp(logvar(w))) from a GRU encoder,   p(z) = N(0, I),
    p(w|z) = prod_t p(w_t | w_<t, z) from a GRU decoder that starts from z and reads z at
    every step (``vae.nn.text``),
    ELBO(w) = E_q[log p(w|z)] - KL(q(z|w) || p(z))   (one sample, closed-form KL),
    loss    = recon + regulariser(KL, step)            (recon = -log p(w|z), pads excluded).

Everything is nats per sentence; the KL regulariser (``kl_schedule``, ``beta``, ``free_bits``,
warm-up, cyclical, capacity) is the Gaussian VAE's part, from the same config keys. Word
dropout (``word_dropout``) replaces the decoder's input words by ``<unk>`` during training only,
the remedy of Bowman et al. for a decoder that ignores z (posterior collapse: KL -> 0).

It is a ``LatentVariableModule`` (same step, logging, guard and checkpoint contracts); a
batch's first element is the token ids (B, T) padded with 0, and the lengths are the non-pad
counts (the data pads only at the end). The image grids become text (``add_text``):

* ``val/samples``: greedy decodings of fixed prior draws z ~ N(0, I);
* ``val/reconstructions``: validation sentences and the greedy decoding of their mu;
* ``val/interpolation``: greedy decodings along mu_1 + t (mu_2 - mu_1), t = 0, 1/6, ..., 1.

``val/perplexity`` is exp(sum -ELBO / sum predicted tokens) per token: from a bound, so it is an
upper bound on the model's perplexity (``vae-eval``'s ``test/perplexity`` uses the tighter
``test/nll_iw``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torchmetrics.aggregation import SumMetric

from vae.data.fortunes import Vocabulary, detokenize
from vae.eval.epoch_statistics import ActiveUnits, KLDecompositionMetric, KLPerDimension
from vae.losses import compute_elbo, gaussian_kl, kl_regulariser
from vae.models.base import LatentVariableModule, build_part
from vae.nn.text import (
    PAD_ID,
    GRUSentenceEncoder,
    LatentGRUDecoder,
    next_token_terms,
    word_dropout,
)
from vae.training import tags
from vae.training.tensorboard import summary_writers

Part = Mapping[str, Any] | Callable[..., Any]
INTERPOLATION_STEPS = 7


class TextVAE(LatentVariableModule):
    """Config keys (``conf/model/text_vae.yaml``) are the constructor arguments.

    Args:
        vocabulary: the tokens, specials first (from the DataModule; saved with the model).
        latent_dim: D, the size of z.
        embed_dim, hidden_dim, num_layers, dropout: both GRUs (``vae.nn.text``).
        word_dropout: probability that a decoder input word becomes ``<unk>`` (training only).
        regulariser: the KL penalty or its config; None: from ``kl_schedule``, ``beta``,
            ``free_bits`` (``vae.losses.kl_regulariser``).
        temperature, top_k: how ``sample_texts`` draws (the logged texts are greedy).
        num_samples, max_sample_tokens: logged texts per tag, and their length cap in words.
        lr, optimizer: as ``GaussianVAE``.
    """

    modality = "text"
    guarded_terms = ("recon", "kl")

    def __init__(
        self,
        vocabulary: Sequence[str],
        latent_dim: int = 16,
        embed_dim: int = 128,
        hidden_dim: int = 256,
        num_layers: int = 1,
        dropout: float = 0.0,
        word_dropout: float = 0.0,
        regulariser: Part | None = None,
        kl_schedule: str = "constant",
        beta: float = 1.0,
        free_bits: float = 0.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        num_samples: int = 8,
        max_sample_tokens: int = 32,
        lr: float = 1e-3,
        optimizer: Part | None = None,
    ) -> None:
        super().__init__(optimizer=optimizer, num_images=num_samples)
        if not 0 <= word_dropout <= 1:
            raise ValueError(f"model.word_dropout must be in [0, 1], got {word_dropout!r}")
        self.save_hyperparameters(logger=False)
        self.vocabulary = Vocabulary(vocabulary)
        self.latent_dim = int(latent_dim)
        size = len(self.vocabulary)
        self.encoder = GRUSentenceEncoder(
            size, latent_dim, embed_dim, hidden_dim, num_layers, dropout
        )
        self.decoder = LatentGRUDecoder(
            size, latent_dim, embed_dim, hidden_dim, num_layers, dropout
        )
        self.word_dropout = float(word_dropout)
        if regulariser is None:
            regulariser = kl_regulariser(kl_schedule, beta=beta, free_bits=free_bits)
        elif isinstance(regulariser, Mapping):
            regulariser = build_part(regulariser)
        self.regulariser = regulariser
        generator = torch.Generator().manual_seed(1234)
        self.register_buffer(
            "sample_z", torch.randn(num_samples, latent_dim, generator=generator), persistent=False
        )
        self.val_active_units = ActiveUnits(self.latent_dim)
        self.val_kl_per_dim = KLPerDimension(self.latent_dim)
        self.val_kl_decomposition = KLDecompositionMetric(self.latent_dim)
        self.val_neg_elbo, self.val_tokens = SumMetric(), SumMetric()

    # --- the model (also the protocol of vae.eval.nll's importance sampling) ----------------
    def encode(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z|w), each (B, latent_dim), for token ids (B, T) padded with 0."""
        return self.encoder(tokens, (tokens != PAD_ID).sum(dim=1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder is autoregressive: its parameters for p(w|z) are z itself."""
        return z

    def reconstruction_nll(
        self, z: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """-log p(w|z) in nats per sentence, (B,): the next-token NLL summed over the
        ``lengths - 1`` predicted tokens (pads excluded). Word dropout applies to the decoder's
        inputs in training mode only; the targets are always ``tokens``."""
        if lengths is None:
            lengths = (tokens != PAD_ID).sum(dim=1)
        inputs = word_dropout(tokens, self.word_dropout) if self.training else tokens
        features, _ = self.decoder.features(inputs, z=z)
        return next_token_terms(features, tokens, lengths, project=self.decoder.output)["nll"]

    @staticmethod
    def reparameterise(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def terms(self, tokens: torch.Tensor, lengths: torch.Tensor, step: int):
        """loss, {loss, recon, kl, beta, elbo} (nats per sentence), (mu, logvar) (B, D) each,
        the KL per dimension (B, D) and recon (B,) of a batch with explicit ``lengths``."""
        mu, logvar = self.encoder(tokens, lengths)
        recon = self.reconstruction_nll(self.reparameterise(mu, logvar), tokens, lengths)
        kl = gaussian_kl(mu, logvar, validate=False)  # (B, D) nats
        terms = compute_elbo(recon, kl, self.regulariser, step, validate=False)
        scalars = {
            "loss": terms.loss,
            "recon": terms.recon,
            "kl": terms.kl,
            "beta": terms.beta,
            "elbo": terms.elbo,
        }
        return terms.loss, scalars, (mu, logvar), kl, recon

    def compute_terms(self, x: torch.Tensor, step: int):
        lengths = (x != PAD_ID).sum(dim=1)
        loss, scalars, (mu, logvar), kl, recon = self.terms(x, lengths, step)
        if not self.training:
            self.val_active_units.update(mu.detach())
            self.val_kl_decomposition.update(mu.detach(), logvar.detach())
            self.val_kl_per_dim.update(kl.detach())
            self.val_neg_elbo.update((recon + kl.sum(-1)).detach().sum())
            self.val_tokens.update((lengths - 1).sum())
        return loss, scalars

    def train_scalar_names(self):
        return ("loss", "recon", "kl", "beta")

    def val_scalar_names(self):
        return ("loss", "recon", "kl", "elbo")

    # --- text -------------------------------------------------------------------------------
    @torch.no_grad()
    def decode_texts(
        self, z: torch.Tensor, top_k: int | None = 1, seed: int = 0, temperature: float = 1.0
    ) -> list[str]:
        """Sentences decoded from ``z`` (N, D): greedy (``top_k`` = 1) or drawn."""
        was_training = self.training
        self.eval()
        ids = self.decoder.sample(
            z.shape[0],
            self.hparams.max_sample_tokens,
            temperature,
            top_k,
            torch.Generator().manual_seed(seed),
            z=z.to(self.device),
        )
        self.train(was_training)
        return [detokenize(self.vocabulary.decode(row)) for row in ids.tolist()]

    def sample_texts(self, num_samples: int | None = None, seed: int = 0) -> list[str]:
        """Sentences from z ~ N(0, I), drawn with ``temperature`` and ``top_k``."""
        hp = self.hparams
        generator = torch.Generator().manual_seed(seed)
        z = torch.randn(num_samples or hp.num_samples, self.latent_dim, generator=generator)
        return self.decode_texts(z, hp.top_k, seed, hp.temperature)

    def sentence(self, row: torch.Tensor) -> str:
        return detokenize(self.vocabulary.decode(row.tolist()))

    def log_val_images(self) -> None:
        """The texts of the module docstring, in place of the image grids."""
        tokens = self._val_images
        if not self.trainer.is_global_zero or self.trainer.sanity_checking or tokens is None:
            return
        mu = self.encode(tokens)[0]
        recon = self.decode_texts(mu)
        texts = {
            tags.VAL_SAMPLES: self.decode_texts(self.sample_z),
            tags.VAL_RECONSTRUCTIONS: [
                f"{self.sentence(row)}  \n→ {r}" for row, r in zip(tokens, recon, strict=True)
            ],
        }
        if mu.shape[0] >= 2:
            t = torch.linspace(0, 1, INTERPOLATION_STEPS, device=mu.device)[:, None]
            texts[tags.VAL_INTERPOLATION] = self.decode_texts(mu[0] + t * (mu[1] - mu[0]))
        for writer in summary_writers(self.loggers):
            for tag, lines in texts.items():
                text = "\n\n".join(f"{i + 1}. {s}" for i, s in enumerate(lines))
                writer.add_text(tag, text, self.global_step)

    # --- statistics of the whole validation epoch ------------------------------------------
    def on_validation_epoch_end(self) -> None:
        if self.val_kl_per_dim.update_called:
            self.log_val_epoch_scalar("active_units", self.val_active_units.compute())
            self.log_val_histogram("kl_per_dim", self.val_kl_per_dim.compute())
            perplexity = torch.exp(self.val_neg_elbo.compute() / self.val_tokens.compute())
            self.log(tags.VAL_PERPLEXITY, perplexity)
            self.log_kl_decomposition(self.val_kl_decomposition)
        for metric in (self.val_active_units, self.val_kl_per_dim, self.val_kl_decomposition):
            metric.reset()
        self.val_neg_elbo.reset()
        self.val_tokens.reset()
        super().on_validation_epoch_end()

    def on_fit_start(self) -> None:
        if self.trainer.is_global_zero and self.trainer.log_dir:
            self.vocabulary.save(Path(self.trainer.log_dir) / "vocab.json")
