"""``model=text_lm``: a GRU text generator trained with the KL loss, done right.

A thin LightningModule around :class:`vae.nn.text.GRULanguageModel` and
:func:`vae.nn.text.next_token_terms`. It has no latent variable, so it does not subclass
``LatentVariableModule`` (whose step, grids and KL logging are about latents and images); it
keeps the same contracts: terms in nats per example (here a sentence), tags from
``vae.training.tags``, ``self.log``, the checkpoint's class and format recorded.

Tags (nats per sentence, pads excluded):

* ``train/loss``, ``val/loss``: KL(target || predicted) summed over a sentence's tokens, the
  training objective (= the NLL with one-hot targets, ``model.label_smoothing=0``);
* ``val/elbo``: log p(sentence) = -NLL. With no latent the bound is exact; it is named so
  that the best checkpoint is chosen by the same key as every other model's;
* ``val/perplexity``: exp(sum NLL / sum predicted tokens) over the validation epoch, per token
  (``<eos>`` counted, ``<bos>`` not);
* ``val/samples``: text samples (temperature ``model.temperature``, ``model.top_k``).

The vocabulary is a hyper-parameter, so the checkpoint carries it; it is also written to
``<run>/vocab.json`` when training starts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from torchmetrics.aggregation import SumMetric

from vae.data.fortunes import Vocabulary, detokenize
from vae.models.base import build_part
from vae.nn.text import GRULanguageModel, next_token_terms
from vae.training import tags
from vae.training.checkpoints import CHECKPOINT_FORMAT
from vae.training.tensorboard import summary_writers

SAMPLE_SEED = 0  # the same draws every epoch, so the samples show what training changed


class TextLanguageModel(pl.LightningModule):
    """Embedding -> GRU -> Linear over a word vocabulary, trained with ``KLDivergence``.

    Args:
        vocabulary: the tokens, ``<pad>`` ``<unk>`` ``<bos>`` ``<eos>`` first (from the
            DataModule; saved with the hyper-parameters).
        embed_dim, hidden_dim, num_layers, dropout: the network (``vae.nn.text``).
        label_smoothing: eps in the target (1 - eps) one_hot + eps / V; 0: one-hot.
        temperature, top_k: sampling of ``val/samples`` (top_k null: all tokens).
        num_samples, max_sample_tokens: how many samples, and their length cap in words.
        lr: the learning rate, fed to the optimizer's config (``model.lr``).
        optimizer: a factory ``optimizer(params=...)`` or its config; None: Adam, lr 1e-3.
    """

    modality = "text"
    guarded_terms = ("loss",)

    def __init__(
        self,
        vocabulary: Sequence[str],
        embed_dim: int = 128,
        hidden_dim: int = 256,
        num_layers: int = 1,
        dropout: float = 0.0,
        label_smoothing: float = 0.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        num_samples: int = 8,
        max_sample_tokens: int = 32,
        lr: float = 1e-3,
        optimizer: Callable | Mapping | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.save_hyperparameters(logger=False)
        self.vocabulary = Vocabulary(vocabulary)
        self.net = GRULanguageModel(
            len(self.vocabulary), embed_dim, hidden_dim, num_layers, dropout
        )
        self.label_smoothing = float(label_smoothing)
        self.optimizer_factory = optimizer
        self.step_terms: Mapping[str, torch.Tensor] = {}
        self.val_nll, self.val_tokens = SumMetric(), SumMetric()

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            return torch.optim.Adam(self.parameters(), lr=1e-3)
        return build_part(self.optimizer_factory, params=self.parameters())

    def terms(self, batch) -> dict[str, torch.Tensor]:
        tokens, lengths = batch
        features, _ = self.net.features(tokens)
        return next_token_terms(
            features, tokens, lengths, self.label_smoothing, project=self.net.output
        )

    def training_step(self, batch, batch_idx):
        terms = self.terms(batch)
        loss = terms["kl"].mean()
        self.step_terms = {"loss": loss}
        # x value: the optimizer steps done once this step is taken, as in LatentVariableModule
        # (a resumed run's purge then removes exactly the events after its checkpoint).
        scalars = {tags.TRAIN_LOSS: loss, "step": float(self.global_step + 1)}
        self.log_dict(scalars, on_step=True, on_epoch=False, batch_size=batch[0].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        terms = self.terms(batch)
        self.step_terms = {"loss": terms["kl"].mean()}
        size = batch[0].shape[0]
        self.log(tags.VAL_LOSS, terms["kl"].mean(), batch_size=size, sync_dist=True)
        self.log(
            tags.VAL_ELBO, -terms["nll"].mean(), batch_size=size, sync_dist=True, prog_bar=True
        )
        self.val_nll.update(terms["nll"].sum())
        self.val_tokens.update(terms["tokens"].sum())

    def on_validation_epoch_end(self) -> None:
        perplexity = torch.exp(self.val_nll.compute() / self.val_tokens.compute())
        self.val_nll.reset()
        self.val_tokens.reset()
        self.log(tags.VAL_PERPLEXITY, perplexity)
        if self.trainer.state.fn == "fit":
            self.log("step", float(self.global_step), on_step=False, on_epoch=True, sync_dist=True)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            text = "\n\n".join(f"{i + 1}. {s}" for i, s in enumerate(self.sample_texts()))
            for writer in summary_writers(self.loggers):
                writer.add_text(tags.VAL_SAMPLES, text, self.global_step)

    def sample_texts(self, num_samples: int | None = None, seed: int = SAMPLE_SEED) -> list[str]:
        """Sentences drawn with ``temperature`` and ``top_k``, from a private generator."""
        hp = self.hparams
        was_training = self.training
        self.eval()
        ids = self.net.sample(
            num_samples or hp.num_samples,
            hp.max_sample_tokens,
            hp.temperature,
            hp.top_k,
            torch.Generator().manual_seed(seed),
        )
        self.train(was_training)
        return [detokenize(self.vocabulary.decode(row)) for row in ids.tolist()]

    def on_fit_start(self) -> None:
        if self.trainer.is_global_zero and self.trainer.log_dir:
            self.vocabulary.save(Path(self.trainer.log_dir) / "vocab.json")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["model_class"] = type(self).__qualname__
        checkpoint["format"] = CHECKPOINT_FORMAT
