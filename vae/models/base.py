"""Shared wiring for every model: optimizer, train/val steps, non-finite guard and logging.

A subclass only says how to turn a batch into loss terms (``compute_terms``) and how to
reconstruct and sample; everything that touches the trainer or the loggers lives here, once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import lightning.pytorch as pl
import torch

from vae.training import tags
from vae.losses import (
    CONTINUOUS_LIKELIHOODS,
    bits_per_dim,
    get_likelihood,
    uniform_dequantize,
)
from vae.training.tensorboard import log_histogram, log_image_grid


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the message names the term and the step."""


def first_nonfinite_term(terms: Mapping[str, torch.Tensor]) -> str | None:
    """Name of the first term that is not finite, or None when all are."""
    for name, value in terms.items():
        if isinstance(value, torch.Tensor) and not bool(torch.isfinite(value).all()):
            return name
    return None


def gradients_are_finite(gradients: list[torch.Tensor]) -> bool:
    """True when every entry of every tensor in the non-empty list ``gradients`` is finite,
    proven cheaply in the common case.

    NaN and inf propagate through sums, so a finite total proves every entry finite, in one
    pass over the gradients (cheaper than a norm). Only a non-finite total, which ``inf - inf``
    or an overflow of huge finite values could also give, pays for the elementwise search.
    The per-tensor sums are added as Python floats (float64). On CPU each is read on its own
    (~1.5 us; fewer kernels than stacking them); on an accelerator they are stacked first, so
    that the check costs one host sync.
    """
    if gradients[0].device.type == "cpu":
        total = sum(g.sum().item() for g in gradients)
    else:
        total = torch.stack([g.sum() for g in gradients]).sum().item()
    if math.isfinite(total):
        return True
    return all(bool(torch.isfinite(g).all()) for g in gradients)


def batch_counting_settings(trainer: pl.Trainer) -> list[str]:
    """Trainer settings under which a training step must be one optimizer step on one batch:
    Lightning counts them in batches, or owns the optimizer step, or syncs gradients through
    one backward per forward. ``train_loop.steps_per_call`` falls back to 1 under any of them.
    """
    reasons = []
    if trainer.world_size > 1:
        reasons.append(f"{trainer.world_size} processes (DDP syncs one backward per forward)")
    if trainer.gradient_clip_val:
        reasons.append("trainer.gradient_clip_val")
    if trainer.accumulate_grad_batches != 1:
        reasons.append("trainer.accumulate_grad_batches")
    if trainer.fast_dev_run:
        reasons.append("trainer.fast_dev_run")
    if trainer.max_steps not in (-1, None):
        reasons.append("trainer.max_steps")
    if trainer.overfit_batches:
        reasons.append("trainer.overfit_batches")
    for key in ("limit_train_batches", "val_check_interval"):
        value = getattr(trainer, key)
        if isinstance(value, int) and not isinstance(value, bool):
            reasons.append(f"trainer.{key} as a count of batches")
    return reasons


def _to_float(value: torch.Tensor | float) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


@dataclass
class NonFiniteGuard:
    """What to do when a loss or gradient is NaN/inf (Hydra keys ``trainer_guard.*``).

    Attributes:
        skip_nonfinite: skip such a batch (no optimizer step) and count it in
            ``skipped_batches`` instead of stopping.
        check_gradients: also check gradient norms before each optimizer step.
        inject_nan_term, inject_nan_step: fault injection for tests: the named loss term is
            NaN for one batch, the first one at that optimizer step.
    """

    skip_nonfinite: bool = False
    check_gradients: bool = True
    inject_nan_term: str | None = None
    inject_nan_step: int | None = None
    skipped_batches: int = 0
    injected: bool = False

    def maybe_inject(self, loss, terms, step: int):
        if self.inject_nan_term is None or self.inject_nan_step is None:
            return loss, terms
        if self.injected or step != self.inject_nan_step:
            return loss, terms
        self.injected = True
        if self.inject_nan_term not in terms:
            raise ValueError(
                f"trainer_guard.inject_nan_term={self.inject_nan_term!r} is not a loss term; "
                f"choose one of {sorted(terms)}"
            )
        poisoned = terms[self.inject_nan_term] * float("nan")
        return loss + poisoned, {**terms, self.inject_nan_term: poisoned}


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
    steps_per_call: int = 1  # optimizer steps per training step; see configure_loop

    # Plain attributes set in the hot loop: Lightning sets ``_current_fx_name`` around every
    # hook call, ~46 times a training step. ``nn.Module.__setattr__`` first checks whether the
    # value is a parameter, buffer or submodule (~2 us a call); these never are.
    _PLAIN_ATTRIBUTES = frozenset({"_current_fx_name", "_latest_train_terms"})

    def __setattr__(self, name: str, value) -> None:
        if name in self._PLAIN_ATTRIBUTES:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def __init__(
        self, optimizer: Callable[..., torch.optim.Optimizer] | None, num_images: int = 64
    ):
        super().__init__()
        self.optimizer_factory = optimizer
        self.num_images = num_images
        self._latest_train_terms: Mapping[str, torch.Tensor | float] | None = None
        self._val_batch_for_images: torch.Tensor | None = None
        self._named_parameters: list[tuple[str, torch.nn.Parameter]] | None = None
        self.guard = NonFiniteGuard()

    def configure_guard(
        self,
        skip_nonfinite: bool = False,
        check_gradients: bool = True,
        inject_nan_term: str | None = None,
        inject_nan_step: int | None = None,
    ) -> None:
        """Set the non-finite policy (Hydra keys ``trainer_guard.*``; see ``NonFiniteGuard``)."""
        self.guard = NonFiniteGuard(
            skip_nonfinite=skip_nonfinite,
            check_gradients=check_gradients,
            inject_nan_term=inject_nan_term,
            inject_nan_step=inject_nan_step,
        )

    # --- the likelihood p(x | latent), shared by every model ---------------------------------
    def set_likelihood(
        self, name: str, log_sigma: torch.Tensor | float = 0.0, data_levels: int | None = None
    ) -> None:
        """Use ``vae.losses`` likelihood ``name``; ``log_sigma`` is the Gaussian/Laplace scale.

        ``log_sigma`` may be a float, a buffer or a parameter the subclass registered itself.
        ``data_levels`` is the number of distinct pixel values of the data (the DataModule's
        ``num_levels``: 2 when binarized, 17 for raw digits, 256 for 8-bit images), or None
        when unknown. A density (Gaussian, Laplace) on discrete pixels is then fitted to
        uniformly dequantized targets, so that its bits/dim are comparable with the literature
        (see :meth:`bits_per_dim`).
        """
        if data_levels is not None and (
            isinstance(data_levels, bool) or not isinstance(data_levels, int) or data_levels < 2
        ):
            raise ValueError(
                f"data_levels must be an integer >= 2 (the DataModule's num_levels), got "
                f"{data_levels!r}"
            )
        self.likelihood_name = name
        self.likelihood = get_likelihood(name)
        self.data_levels = data_levels
        self.dequantization_levels = data_levels if name in CONTINUOUS_LIKELIHOODS else None
        if not isinstance(log_sigma, torch.Tensor):
            self.log_sigma = log_sigma

    @property
    def reports_bits_per_dim(self) -> bool:
        """Whether this model's NLL has bits/dim comparable with papers (see bits_per_dim)."""
        if self.data_levels is None:
            return False
        return self.dequantization_levels is not None or self.data_levels == 2

    def bits_per_dim(self, nll: torch.Tensor | float) -> torch.Tensor | float | None:
        """An NLL (nats per example) as bits per pixel comparable with the literature, or None.

        * Bernoulli on binarized pixels: a probability, so nll / (pixels * ln 2).
        * Gaussian / Laplace: a density of the dequantized pixels y = (k + u) / L, so
          nll / (pixels * ln 2) + log2(L), a bound on the discrete pixels' bits/dim.
        * Bernoulli on grey levels (not a normalised likelihood), or data of unknown depth:
          None, and no ``*/bits_per_dim`` is logged.
        """
        if not self.reports_bits_per_dim:
            return None
        return bits_per_dim(nll, self.num_pixels, self.dequantization_levels)

    def reconstruction_nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """-log p(x | latent) in nats per example, shape (B,), from raw decoder outputs.

        For a density on discrete pixels, of the dequantized pixels (k + u) / L with a fresh
        u ~ U[0, 1) at every call (training, validation and each importance sample alike).
        """
        if self.likelihood_name == "bernoulli":
            return self.likelihood(params, x, validate=False)
        if self.dequantization_levels is not None:
            x = uniform_dequantize(x, self.dequantization_levels)
        return self.likelihood(params, x, self.log_sigma, validate=False)

    def decoder_mean(self, params: torch.Tensor) -> torch.Tensor:
        """E[x | latent] for display: sigmoid(logits) for Bernoulli, the location otherwise."""
        return torch.sigmoid(params) if self.likelihood_name == "bernoulli" else params

    # --- subclass interface -------------------------------------------------------------
    def compute_terms(
        self, x: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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

    # --- the training loop ---------------------------------------------------------------------
    def configure_loop(self, steps_per_call: int = 1) -> None:
        """Take ``steps_per_call`` optimizer steps in each training step (Hydra key
        ``train_loop.steps_per_call``).

        With 1 (the default) Lightning's automatic optimisation takes one step per batch. With
        K > 1 the DataModule serves packs of K batches (``pack_training_batches``) and
        :meth:`training_step` runs K steps itself (Lightning's manual optimisation), so that
        Lightning's per-batch machinery runs once per K steps (``vae_fashion`` on a 2-core CPU:
        0.87-0.88x a bare loop with K=1, 0.93-0.98x with K=8; ``bench_train_throughput.py``).
        Each step is the same as with 1: same batches and noise, the loss and gradient checks,
        skipped batches, ``train/*`` logging at the same global steps, ``global_step`` counting
        optimizer steps. Callbacks' ``on_train_batch_*`` hooks, ``batch_idx`` and the progress
        bar count packs. The entry point falls back to 1 where Lightning counts batches or owns
        the step (``batch_counting_settings``).
        """
        if isinstance(steps_per_call, bool) or not isinstance(steps_per_call, int):
            raise ValueError(
                f"train_loop.steps_per_call must be an integer, got {steps_per_call!r}"
            )
        if steps_per_call < 1:
            raise ValueError(
                f"train_loop.steps_per_call must be >= 1, got {steps_per_call}. "
                "Use 1 for one optimizer step per Lightning batch."
            )
        self.steps_per_call = steps_per_call
        self.automatic_optimization = steps_per_call == 1

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            return self.checked_loss(batch[0])
        optimizer = self.optimizers()
        for x, _ in batch:  # a pack of batches, one optimizer step each
            loss = self.checked_loss(x)
            optimizer.zero_grad(set_to_none=True)
            if loss is not None:
                self.manual_backward(loss)
            # As in Lightning's automatic loop, a skipped batch still steps, with no gradients
            # (a no-op that counts in global_step). Runs on_before_optimizer_step.
            optimizer.step()
        return None

    def checked_loss(self, x: torch.Tensor) -> torch.Tensor | None:
        """The loss of one training batch, after the non-finite check; None to skip the batch."""
        loss, terms = self.compute_terms(x, step=self.global_step)
        loss, terms = self.guard.maybe_inject(loss, terms, self.global_step)
        # One host sync per step. ``torch.isfinite`` is a composite of several kernels (~8 us
        # alone, ~70 us measured inside the training loop on CPU); ``.item()`` costs ~5 us there.
        if not math.isfinite(loss.item()):
            if self.guard.skip_nonfinite:
                self.guard.skipped_batches += 1
                return None  # no backward and no optimizer step for this batch
            self.raise_nonfinite(loss, terms)
        self._latest_train_terms = terms  # for metrics.json; converted only when read
        if self._should_log_train_step():
            self.log_train_scalars(terms)
        return loss

    def on_fit_start(self) -> None:
        self._named_parameters = None  # the gradient check lists them afresh

    def on_before_optimizer_step(self, optimizer) -> None:
        """Stop (or skip the step) when a gradient is NaN/inf, naming the parameter.

        Not under a gradient scaler (``trainer.precision=16-mixed``): there inf gradients are
        how the scaler finds its scale (it skips that step and halves the scale, and it grows
        the scale until they recur), so they are not a failure. The loss check still stops a
        NaN loss.
        """
        if not self.guard.check_gradients or self._gradient_scaler() is not None:
            return
        if self._named_parameters is None:  # listed once per fit: the walk costs ~15 us
            self._named_parameters = list(self.named_parameters())
        named = [(n, p.grad) for n, p in self._named_parameters if p.grad is not None]
        if not named:
            return
        if gradients_are_finite([g for _, g in named]):
            return
        culprit = next(n for n, g in named if not bool(torch.isfinite(g).all()))
        if self.guard.skip_nonfinite:
            self.guard.skipped_batches += 1
            for parameter in self.parameters():
                parameter.grad = None  # the optimizer leaves parameters without grads alone
            return
        raise NonFiniteLossError(
            f"non-finite gradient of {culprit} at training step {self.global_step} "
            f"(epoch {self.current_epoch}). Training stopped; the last good checkpoint is kept "
            "in the run's checkpoints/ folder. Try trainer.gradient_clip_val=1.0, a lower "
            "model.lr, or trainer_guard.skip_nonfinite=true to skip such batches."
        )

    def _gradient_scaler(self):
        """The trainer's ``torch.amp.GradScaler`` (fp16 mixed precision), or None."""
        if self._trainer is None:
            return None
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def validation_step(self, batch, batch_idx):
        x = batch[0]
        _, terms = self.compute_terms(x, step=self.global_step)
        self.log_val_scalars(terms, batch_size=x.shape[0])
        if batch_idx == 0:
            self._val_batch_for_images = x[: self.num_images]
        return terms

    # --- guards ---------------------------------------------------------------------------------
    def raise_nonfinite(self, loss: torch.Tensor, terms: Mapping[str, torch.Tensor]) -> None:
        """Stop at the step where the loss stopped being finite, naming the culprit term."""
        checked = {name: terms[name] for name in self.guarded_terms if name in terms}
        culprit = first_nonfinite_term(checked) or "loss"
        value = terms.get(culprit, loss)
        raise NonFiniteLossError(
            f"non-finite {culprit} ({float(value.detach().float().mean())}) at training step "
            f"{self.global_step} (epoch {self.current_epoch}). Training stopped; the last good "
            "checkpoint is kept in the run's checkpoints/ folder. Try a lower model.lr, gradient "
            "clipping (trainer.gradient_clip_val=1.0), model.logvar_clamp=[-10,10], or "
            "trainer_guard.skip_nonfinite=true to skip such batches."
        )

    # --- logging: the one place that writes -----------------------------------------------
    # Train scalars are written at step = global_step + 1, the optimizer steps completed once
    # this batch's step is taken (Lightning's own convention). Validation at the end of an
    # epoch is written at global_step, so everything logged before a checkpoint at step G has
    # step <= G and everything after it > G: a resumed run purges exactly the stale tail.
    def _should_log_train_step(self) -> bool:
        every = max(1, int(self.trainer.log_every_n_steps or 1)) if self._trainer else 1
        return (self.global_step + 1) % every == 0

    def log_train_scalars(self, terms: Mapping[str, torch.Tensor | float]) -> None:
        scalars = self._train_scalars(terms)
        if self._trainer is None:
            return
        for logger in self.loggers:
            logger.log_metrics(scalars, step=self.global_step + 1)

    def _train_scalars(self, terms: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
        return {tags.tag("train", n): _to_float(terms[n]) for n in self.train_scalar_names()}

    @property
    def last_train_scalars(self) -> dict[str, float]:
        """``train/*`` values of the most recent training step (logged or not)."""
        if self._latest_train_terms is None:
            return {}
        return self._train_scalars(self._latest_train_terms)

    def log_val_scalars(self, terms: Mapping[str, torch.Tensor], batch_size: int) -> None:
        self.log_scalars("val", terms, self.val_scalar_names(), batch_size=batch_size)

    def log_scalars(
        self,
        prefix: str,
        terms: Mapping[str, torch.Tensor],
        names: tuple[str, ...],
        batch_size: int,
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
        # Computed from statistics already summed over processes: identical on every rank.
        self.log(tags.tag("val", name), float(value), on_step=False, on_epoch=True, sync_dist=True)

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
        if self.trainer.state.fn == "fit":
            # Lightning writes epoch-end metrics at its own count of batches that stepped: with
            # packs of batches (configure_loop) a count of packs, and otherwise one less than
            # the steps done. A logged "step" sets the x value: the optimizer steps done, as for
            # the images and histograms and the checkpoint taken after this validation. The
            # same on every process.
            step = float(self.global_step)
            self.log("step", step, on_step=False, on_epoch=True, sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the class, so that loading into another model fails with a clear message."""
        checkpoint["model_class"] = type(self).__qualname__
        checkpoint["skipped_batches"] = self.guard.skipped_batches
        checkpoint["steps_per_call"] = self.steps_per_call

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.guard.skipped_batches = int(checkpoint.get("skipped_batches", 0))

    def hparam_metric_tags(self) -> tuple[str, ...]:
        """Tags the HParams tab shows next to each run's config (their final values)."""
        return tuple(tags.tag("val", name) for name in self.val_scalar_names())
