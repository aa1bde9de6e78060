"""Shared wiring for every model: optimizer, train/val steps, non-finite guard and logging.

A subclass only says how to turn a batch into loss terms (``compute_terms``) and how to
reconstruct and sample; everything that touches the trainer or the loggers lives here, once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch

from vae import tags
from vae.tensorboard import log_histogram, log_image_grid


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the message names the term and the step."""


def first_nonfinite_term(terms: Mapping[str, torch.Tensor]) -> str | None:
    """Name of the first term that is not finite, or None when all are."""
    for name, value in terms.items():
        if isinstance(value, torch.Tensor) and not bool(torch.isfinite(value).all()):
            return name
    return None


def _to_float(value: torch.Tensor | float) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


class LatentVariableModule(pl.LightningModule):
    """Base LightningModule.

    Subclasses implement:
      * ``compute_terms(x, step) -> (loss, {name: scalar tensor})`` in nats per example;
      * ``reconstruct(x)`` and ``sample(n)`` returning images in the data range, for the grids;
      * optionally ``guarded_terms``: the names checked, in order, when the loss is not finite.

    Train scalars are written every ``trainer.log_every_n_steps`` optimizer steps straight to the
    loggers (no per-step ``self.log`` bookkeeping in the hot loop); validation scalars go through
    ``self.log(on_epoch=True)`` so Lightning averages them over the epoch, weighted by batch size,
    and syncs them across processes.
    """

    guarded_terms: tuple[str, ...] = ()

    def __init__(self, optimizer: Callable[..., torch.optim.Optimizer] | None, num_images: int = 64):
        super().__init__()
        self.optimizer_factory = optimizer
        self.num_images = num_images
        self.last_train_scalars: dict[str, float] = {}
        self._val_batch_for_images: torch.Tensor | None = None

    # --- subclass interface -------------------------------------------------------------
    def compute_terms(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, num_samples: int) -> torch.Tensor:
        raise NotImplementedError

    def train_scalar_names(self) -> tuple[str, ...]:
        """Term names logged as ``train/<name>``."""
        raise NotImplementedError

    def val_scalar_names(self) -> tuple[str, ...]:
        """Term names logged as ``val/<name>`` (epoch means)."""
        raise NotImplementedError

    # --- optimisation -----------------------------------------------------------------------
    def configure_optimizers(self):
        if self.optimizer_factory is None:
            return torch.optim.Adam(self.parameters(), lr=1e-3)
        return self.optimizer_factory(params=self.parameters())

    def training_step(self, batch, batch_idx):
        x = batch[0]
        loss, terms = self.compute_terms(x, step=self.global_step)
        self.raise_if_nonfinite(loss, terms)
        if self._should_log_train_step():
            self.log_train_scalars(terms)
        return loss

    def validation_step(self, batch, batch_idx):
        x = batch[0]
        _, terms = self.compute_terms(x, step=self.global_step)
        self.log_val_scalars(terms, batch_size=x.shape[0])
        if batch_idx == 0:
            self._val_batch_for_images = x[: self.num_images]
        return terms

    def test_step(self, batch, batch_idx):
        """The validation terms on the test split, logged as ``test/<name>`` epoch means."""
        x = batch[0]
        _, terms = self.compute_terms(x, step=self.global_step)
        self.log_scalars("test", terms, self.val_scalar_names(), batch_size=x.shape[0])
        return terms

    # --- guards ---------------------------------------------------------------------------------
    def raise_if_nonfinite(self, loss: torch.Tensor, terms: Mapping[str, torch.Tensor]) -> None:
        """Stop at the step where the loss stops being finite, naming the culprit term.

        One host sync per step (``bool(isfinite)``); the search for the term runs only on failure.
        """
        if bool(torch.isfinite(loss)):
            return
        checked = {name: terms[name] for name in self.guarded_terms if name in terms}
        culprit = first_nonfinite_term(checked) or "loss"
        value = terms.get(culprit, loss)
        raise NonFiniteLossError(
            f"non-finite {culprit} ({float(value.detach().float().mean())}) at training step "
            f"{self.global_step} (epoch {self.current_epoch}). Training stopped; the last good "
            "checkpoint is kept in the run's checkpoints/ folder. Try a lower model.lr, gradient "
            "clipping (trainer.gradient_clip_val=1.0) or model.logvar_clamp=[-10,10]."
        )

    # --- logging: the one place that writes -----------------------------------------------
    def _should_log_train_step(self) -> bool:
        every = max(1, int(self.trainer.log_every_n_steps or 1)) if self._trainer else 1
        return self.global_step % every == 0

    def log_train_scalars(self, terms: Mapping[str, torch.Tensor | float]) -> None:
        scalars = {
            tags.tag("train", name): _to_float(terms[name]) for name in self.train_scalar_names()
        }
        self.last_train_scalars = scalars
        if self._trainer is None:
            return
        for logger in self.loggers:
            logger.log_metrics(scalars, step=self.global_step)

    def log_val_scalars(self, terms: Mapping[str, torch.Tensor], batch_size: int) -> None:
        self.log_scalars("val", terms, self.val_scalar_names(), batch_size=batch_size)

    def log_scalars(
        self, prefix: str, terms: Mapping[str, torch.Tensor], names: tuple[str, ...], batch_size: int
    ) -> None:
        """Epoch means (weighted by batch size, synced across processes) as ``prefix/name``."""
        for name in names:
            self.log(
                tags.tag(prefix, name),
                terms[name],
                on_step=False,
                on_epoch=True,
                batch_size=batch_size,
                sync_dist=True,
                prog_bar=name in ("loss", "elbo"),
            )

    def log_val_epoch_scalar(self, name: str, value: float | torch.Tensor) -> None:
        """A scalar computed once per validation epoch (e.g. active units)."""
        self.log(tags.tag("val", name), float(value), on_step=False, on_epoch=True)

    def log_val_histogram(self, name: str, values: torch.Tensor) -> None:
        if self.trainer.is_global_zero:
            log_histogram(self.loggers, tags.tag("val", name), values, self.global_step)

    def log_val_images(self) -> None:
        """``val/reconstructions`` (originals above reconstructions) and ``val/samples``."""
        x = self._val_batch_for_images
        if x is None or not self.trainer.is_global_zero or self.trainer.sanity_checking:
            return
        with torch.no_grad():
            recon = self.reconstruct(x)
            half = max(1, x.shape[0] // 2)
            pairs = torch.cat([x[:half], recon[:half]], dim=0)
            nrow = half if half <= 16 else 16
            if half > 16:  # interleave rows of 16 originals with their reconstructions
                rows = [
                    torch.cat([x[i : i + 16], recon[i : i + 16]])
                    for i in range(0, half - half % 16, 16)
                ]
                pairs = torch.cat(rows, dim=0)
            log_image_grid(self.loggers, tags.VAL_RECONSTRUCTIONS, pairs, self.global_step, nrow)
            samples = self.sample(self.num_images)
            if samples is not None:
                log_image_grid(self.loggers, tags.VAL_SAMPLES, samples, self.global_step)

    def on_validation_epoch_end(self) -> None:
        self.log_val_images()
        self._val_batch_for_images = None

    def hparam_metric_tags(self) -> tuple[str, ...]:
        """Tags the HParams tab shows next to each run's config (their final values)."""
        return tuple(tags.tag("val", name) for name in self.val_scalar_names())
