"""The training step that every model shares: compute the loss terms, log them, show images.

A model says three things (see ``GaussianVAE`` for a complete one):

* ``compute_terms(x, step) -> (loss, {name: scalar})``: every term in nats per example;
* ``reconstruct(x)`` and ``sample(n)``: images in the data range, for the grids;
* ``train_scalar_names()`` / ``val_scalar_names()``: which terms become ``train/<name>`` and
  ``val/<name>`` (tags in ``vae.training.tags``).

Lightning runs the loop (one optimizer step per batch, ``self.log`` for every scalar), the
callbacks in ``vae.training.callbacks`` guard it (NaN/inf, RNG states, checkpoints), and the
maths lives in ``vae.losses`` and ``vae.nn``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from torchmetrics import MeanMetric

from vae.training import tags
from vae.training.checkpoints import CHECKPOINT_FORMAT
from vae.training.tensorboard import log_histogram, log_image_grid

LR_SCHEDULES = ("constant", "cosine")


def build_part(part: Any, **kwargs: Any) -> Any:
    """A model part from its config (a mapping with ``_target_``, as saved in the checkpoint's
    hyper-parameters) or from a factory such as ``functools.partial``, completed by ``kwargs``.

    Parts arrive as configs so that ``Model.load_from_checkpoint(path)`` can rebuild them.
    """
    if isinstance(part, Mapping):  # `_partial_` only says that kwargs complete it here
        config = {key: value for key, value in part.items() if key != "_partial_"}
        return instantiate(config, **kwargs, _convert_="all")
    return part(**kwargs)


class LatentVariableModule(pl.LightningModule):
    """Base LightningModule: one generic training and validation step, and the logging.

    Args:
        optimizer: a factory ``optimizer(params=...)`` or its config (Hydra ``_partial_``);
            None means Adam with lr 1e-3.
        num_images: images in ``val/reconstructions`` and ``val/samples``.
        lr_schedule: ``constant`` keeps the optimizer's learning rate; ``cosine`` decays it to 0
            over the run's optimizer steps (``trainer.max_epochs``), a half cosine stepped every
            batch (``torch.optim.lr_scheduler.CosineAnnealingLR``).
    """

    guarded_terms: tuple[str, ...] = ()  # checked in this order when the loss is not finite
    compiled_parts: tuple[str, ...] = ("encoder", "decoder", "prior")  # see compile_networks

    def __init__(
        self,
        optimizer: Callable | Mapping | None = None,
        num_images: int = 64,
        lr_schedule: str = "constant",
    ):
        super().__init__()
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"model.lr_schedule={lr_schedule!r} is not known; use one of {LR_SCHEDULES}"
            )
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_schedule
        self.num_images = num_images
        self.step_terms: Mapping[str, torch.Tensor] = {}  # this step's terms, for the guard
        self._val_images: torch.Tensor | None = None

    # --- what a model provides -------------------------------------------------------------
    def compute_terms(
        self, x: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, num_samples: int) -> torch.Tensor | None:
        raise NotImplementedError

    def train_scalar_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    def val_scalar_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    # --- the steps ---------------------------------------------------------------------------
    def configure_optimizers(self):
        if self.optimizer_factory is None:
            optimizer = torch.optim.Adam(self.parameters(), lr=1e-3)
        else:
            optimizer = build_part(self.optimizer_factory, params=self.parameters())
        if self.lr_schedule == "constant":
            return optimizer
        steps = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def training_step(self, batch, batch_idx):
        x = batch[0]
        loss, self.step_terms = self.compute_terms(x, step=self.global_step)
        # Logged on the steps Lightning writes (every trainer.log_every_n_steps), and on each
        # epoch's last batch so that metrics.json holds its final values: each self.log call
        # costs ~0.3 ms, 20% of a small model's CPU step if made every step.
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0 or (
            self.trainer.is_last_batch
        ):
            scalars = {tags.tag("train", n): self.step_terms[n] for n in self.train_scalar_names()}
            # x value: the optimizer steps done once this batch's step is taken (Lightning's is
            # one less). So whatever is logged after a checkpoint at step G lies above G, and a
            # resumed run's purge (events from G + 1 on) removes exactly the stale tail.
            scalars["step"] = float(self.global_step + 1)
            self.log_dict(scalars, on_step=True, on_epoch=False, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        x = batch[0]
        _, terms = self.compute_terms(x, step=self.global_step)
        self.step_terms = terms  # the guard checks them before anything is written
        means = self.validation_means()
        for name in self.val_scalar_names():
            # The epoch mean over every example of the split, weighted by batch size, with the
            # sums and counts added over processes (Lightning's own synced mean averages the
            # processes' example counts, which is wrong when the shares differ).
            means[name].update(terms[name].detach(), weight=x.shape[0])
            self.log(tags.tag("val", name), means[name], on_epoch=True, prog_bar=name == "elbo")
        if batch_idx == 0:
            self._val_images = x[: self.num_images]

    def compile_networks(self, **options: Any) -> None:
        """``model.compile=true``: ``torch.compile`` each of ``compiled_parts`` that exists, in
        place (``nn.Module.compile``), so that the state-dict keys, and with them checkpoints
        and resume, are those of the plain modules (no ``_orig_mod.`` prefix). The quantizer,
        the likelihood and the metrics stay eager: they hold data-dependent control flow and
        collectives. ``options`` go to ``torch.compile`` (e.g. ``backend``, ``mode``)."""
        for name in self.compiled_parts:
            part = getattr(self, name, None)
            if isinstance(part, torch.nn.Module):
                part.compile(**options)

    def use_channels_last(self) -> None:
        """``model.channels_last=true``: keep the conv weights in the NHWC memory layout
        (``torch.channels_last``), which cuDNN's tensor-core kernels read without transposes;
        on a GPU with bf16 this is usually faster. A convolution with NHWC weights returns NHWC
        activations whatever the layout of its input, so the images need no conversion of
        their own. The numbers do not change (the same logical tensors, other strides), nor do
        the checkpoints: a saved weight loads into a model in either layout. A model without
        any ``Conv2d`` is refused: there the layout would only add copies."""
        if not any(isinstance(m, torch.nn.Conv2d) for m in self.modules()):
            raise ValueError(
                f"model.channels_last=true is for conv networks, and {type(self).__name__} "
                "here has no Conv2d layer: set model.arch=conv, or drop model.channels_last"
            )
        self.to(memory_format=torch.channels_last)

    def validation_means(self) -> torch.nn.ModuleDict:
        """One ``MeanMetric`` per validation scalar, made on first use (the names can depend
        on the data, e.g. bits_per_dim); Lightning computes, syncs and resets them."""
        if not hasattr(self, "val_means"):
            self.val_means = torch.nn.ModuleDict(
                {name: MeanMetric() for name in self.val_scalar_names()}
            ).to(self.device)
        return self.val_means

    def on_validation_epoch_end(self) -> None:
        self.log_val_images()
        self._val_images = None
        if self.trainer.state.fn == "fit":
            # Put this epoch's val/* scalars at the optimizer steps done, like the images, the
            # histograms and the checkpoint taken after this validation (Lightning's own x value
            # is one less). Logging "step" is Lightning's documented way to set it.
            self.log("step", float(self.global_step), on_step=False, on_epoch=True, sync_dist=True)

    # --- logging helpers for subclasses --------------------------------------------------------
    def log_val_epoch_scalar(self, name: str, value: float | torch.Tensor) -> None:
        """A scalar computed once per validation epoch (e.g. active units), already synced."""
        self.log(tags.tag("val", name), float(value), on_step=False, on_epoch=True)

    def log_kl_decomposition(self, metric) -> None:
        """``val/mutual_info``, ``val/total_correlation`` and ``val/dimwise_kl`` of the epoch,
        from a ``vae.eval.KLDecompositionMetric`` fed every validation batch's (mu, logvar)."""
        result = metric.compute()
        for name in tags.KL_DECOMPOSITION:
            self.log_val_epoch_scalar(name, getattr(result, name))

    def log_val_histogram(self, name: str, values: torch.Tensor) -> None:
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            log_histogram(self.loggers, tags.tag("val", name), values, self.global_step)

    def val_display_images(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(inputs, originals) of the first ``num_images`` validation examples: the images as
        the model sees them, and as a person should see them. With binarized data the inputs
        are 0/1 draws (salt-and-pepper noise on grey images) and the originals are the grey
        intensities they were drawn from, which the DataModule's ``val_split`` keeps. Without a
        DataModule: the first validation batch, as both."""
        split = getattr(getattr(self.trainer, "datamodule", None), "val_split", None)
        if split is not None:
            inputs = split.images[: self.num_images].to(self.device)
            return inputs, getattr(split, "originals", split.images)[: self.num_images]
        x = self._val_images
        return None if x is None else (x, x)

    def log_val_images(self) -> None:
        """``val/reconstructions`` (rows of grey originals above the decoder means of their
        inputs) and ``val/samples`` (the model's samples, when it has a prior worth sampling).
        Both are decoder means: probabilities for a Bernoulli likelihood, never 0/1 draws."""
        if not self.trainer.is_global_zero or self.trainer.sanity_checking:
            return
        display = self.val_display_images()
        if display is None:
            return
        x, originals = display
        with torch.no_grad():
            recon = self.reconstruct(x).cpu()
            x = originals.to(recon.device, recon.dtype)
            half = max(1, x.shape[0] // 2)
            per_row = min(16, half)
            rows = [
                torch.cat([x[i : i + per_row], recon[i : i + per_row]])
                for i in range(0, half - half % per_row, per_row)
            ]
            log_image_grid(
                self.loggers, tags.VAL_RECONSTRUCTIONS, torch.cat(rows), self.global_step, per_row
            )
            samples = self.sample(self.num_images)
            if samples is not None:
                log_image_grid(self.loggers, tags.VAL_SAMPLES, samples, self.global_step)

    # --- checkpoints -----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the class and format, so that loading into another model fails clearly."""
        checkpoint["model_class"] = type(self).__qualname__
        checkpoint["format"] = CHECKPOINT_FORMAT
