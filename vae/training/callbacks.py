"""Lightning callbacks of this project."""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vae.training.tensorboard import summary_writers


def flush_events(loggers) -> None:
    """Write the events logged so far to disk (``SummaryWriter`` queues them for a thread)."""
    for writer in summary_writers(loggers):
        writer.flush()


class TrainThroughput(pl.Callback):
    """Training examples per second of wall time spent in training batches.

    The clock runs from the start of each training epoch to its end, paused while validation
    runs, so start-up, sanity checks and validation are excluded; data loading, forward,
    backward and optimiser steps are included. The result is ``samples_per_s`` (and is written
    to ``metrics.json`` as ``train_samples_per_s``).

    The pause is keyed to the clock itself, not to ``trainer.training``: Lightning switches
    the trainer's stage to validating *before* it calls ``on_validation_start``, so a check of
    ``trainer.training`` there is always false and would leave the clock running through
    validation.
    """

    def __init__(self) -> None:
        self.samples = 0
        self.seconds = 0.0
        self._started: float | None = None
        self._paused = False

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else float("nan")

    def _start(self) -> None:
        self._started = time.perf_counter()

    def _stop(self) -> None:
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._paused = False
        self._start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.samples += int(batch[0].shape[0])

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._started is not None:  # validation inside a training epoch
            self._stop()
            self._paused = True

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._paused:
            self._paused = False
            self._start()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._paused = False
        self._stop()

    def state_dict(self) -> dict:
        return {"samples": self.samples, "seconds": self.seconds}

    def load_state_dict(self, state_dict: dict) -> None:
        self.samples = state_dict.get("samples", 0)
        self.seconds = state_dict.get("seconds", 0.0)


class RNGStates(pl.Callback):
    """Saves the Python, NumPy and torch (CPU and CUDA) RNG states in every checkpoint and
    restores them when training resumes, so the reparameterisation noise after a resume is the
    noise the uninterrupted run would have drawn.

    The states are re-applied in ``on_train_start``, after Lightning's sanity check (which runs
    under its own isolated RNG) and just before the first resumed batch.
    """

    def __init__(self) -> None:
        self._pending: dict | None = None

    def state_dict(self) -> dict:
        # NumPy's state is stored as plain values and a tensor, so that checkpoints stay
        # loadable with torch.load(weights_only=True) (e.g. Model.load_from_checkpoint).
        kind, keys, position, has_gauss, cached = np.random.get_state()
        state = {
            "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer, pl_module) -> None:
        if self._pending is None:
            return
        random.setstate(self._pending["python"])
        kind, keys, position, has_gauss, cached = self._pending["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
        torch.set_rng_state(self._pending["torch"])
        if "cuda" in self._pending and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self._pending["cuda"])
        self._pending = None


class LastCheckpoint(pl.callbacks.Checkpoint):
    """Keeps ``<dirpath>/last.ckpt`` the latest state: after every training epoch (after its
    validation) and every ``every_n_train_steps`` optimizer steps.

    Lightning's ``ModelCheckpoint(save_last=True)`` refreshes ``last.ckpt`` only when it also
    saved a top-k checkpoint at that step, so once ``val/elbo`` stops improving its
    ``last.ckpt`` falls behind the run. Writes go through the trainer (rank 0, the atomic
    checkpoint IO of ``vae.training.checkpoints``).

    A ``Checkpoint`` subclass, so that Lightning calls its epoch-end hook with the checkpoint
    callbacks, after ``ModelCheckpoint`` (listed before it) has saved this epoch's best: the
    saved state then knows that best, and a resumed run replaces it instead of keeping two.

    ``last.ckpt`` never gets ahead of the TensorBoard events: a resumed run hides the events
    after its checkpoint's step, so an event up to that step that was not on disk when the
    writer died would be a gap for good. Events are flushed before every save. A step save
    is written where Lightning expects it (batch end) but Lightning logs that step's train/*
    after that hook, so the file replaces ``last.ckpt`` only at the next batch's start; a
    writer killed in between leaves the previous ``last.ckpt`` and a temporary that the
    resume removes.
    """

    FILENAME = "last.ckpt"

    def __init__(self, dirpath: str, every_n_train_steps: int | None = 200) -> None:
        self.dirpath = dirpath
        self.every_n_train_steps = every_n_train_steps or 0
        self._saved_step: int | None = None
        self._pending_step: int | None = None

    @property
    def path(self) -> str:
        return os.path.join(self.dirpath, self.FILENAME)

    @property
    def pending_path(self) -> str:
        """A step save not yet published; matches ``checkpoints.TEMPORARY_PATTERN``."""
        return os.path.join(self.dirpath, f".{self.FILENAME}.pending.tmp")

    def _save(self, trainer, path: str | None = None) -> bool:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return False
        flush_events(trainer.loggers)
        trainer.save_checkpoint(path or self.path, weights_only=False)
        return True

    def _publish(self, trainer) -> None:
        """The pending step save becomes ``last.ckpt``, once the events of its step are on disk."""
        if self._pending_step is None:
            return
        flush_events(trainer.loggers)
        if trainer.is_global_zero:
            os.replace(self.pending_path, self.path)
        self._saved_step, self._pending_step = self._pending_step, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self.every_n_train_steps
        if every and trainer.global_step % every == 0:
            if self._save(trainer, self.pending_path):
                self._pending_step = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._publish(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._pending_step = None  # this save holds the same step, and the epoch's validation
        if self._save(trainer):
            self._saved_step = trainer.global_step
        if trainer.is_global_zero and os.path.exists(self.pending_path):
            os.remove(self.pending_path)

    def on_train_end(self, trainer, pl_module) -> None:
        self._publish(trainer)  # a fit that stopped mid-epoch (max_steps) after a step save

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            # Maybe raised before Lightning logged the pending save's step: keep the last one.
            self._pending_step = None
            if trainer.is_global_zero and os.path.exists(self.pending_path):
                os.remove(self.pending_path)
            return
        # Lightning stops on SIGTERM at a step boundary (a scheduler's or `timeout`'s), after
        # logging that step: keep that state, so that a resume continues from there. Not when
        # it stops inside a validation, whose half-done state a resume would not redo, nor
        # right after an epoch whose end was saved already (the epoch counter has moved on
        # since, and a resume from that state would skip an epoch): the last save stands.
        self._publish(trainer)
        if trainer.training and trainer.global_step != self._saved_step and self._save(trainer):
            self._saved_step = trainer.global_step


class SlurmRequeue(pl.Callback):
    """Requeue a SLURM job on its warning signal and stop it at a step boundary.

    Under SLURM, Lightning's ``SLURMEnvironment(auto_requeue=True, requeue_signal=SIGUSR1)``
    (its default there) answers the signal that ``#SBATCH --signal=USR1@90`` sends before the
    time limit: it saves an ``hpc_ckpt_<n>.ckpt`` and runs ``scontrol requeue <job id>``.
    It does that work inside the signal handler, which flushes the TensorBoard writer there;
    a signal that lands while the main thread holds that writer's lock deadlocks the job
    until SLURM kills it, with nothing saved (seen with Lightning 2.6 on a digits run).

    This callback takes the signal first (Lightning then keeps its hands off it): the handler
    only notes it. At the end of the next training batch, process 0's note is shared with
    every process, process 0 runs ``scontrol requeue`` (the array task's id in a job array),
    and all stop as on SIGTERM: ``LastCheckpoint`` saves ``last.ckpt`` at that step and
    ``vae-train`` exits 143. The requeued job keeps its ``SLURM_JOB_ID``, so it computes the
    same run directory and resumes from that ``last.ckpt``
    (``vae.training.runs.requeued_checkpoint``). Outside SLURM it does nothing.
    """

    def __init__(self) -> None:
        self._signal: int | None = None
        self._previous_handler = None
        self._requested = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        environment = trainer._accelerator_connector.cluster_environment
        if (
            stage != "fit"
            or not isinstance(environment, SLURMEnvironment)
            or not environment.auto_requeue
            or environment.requeue_signal is None
            or threading.current_thread() is not threading.main_thread()
        ):
            return
        self._signal = environment.requeue_signal
        self._previous_handler = signal.signal(self._signal, self._note_signal)

    def _note_signal(self, signum, frame) -> None:
        self._requested = True  # nothing else: see the class docstring

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._signal is None:
            return
        # Every process stops at the same step, or the first collective after it would hang.
        if not trainer.strategy.broadcast(self._requested, src=0):
            return
        self._requested = False
        if trainer.is_global_zero:
            requeue_slurm_job()
        trainer._signal_connector.received_sigterm = True  # Lightning stops after this batch

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._signal is not None:
            signal.signal(self._signal, self._previous_handler)
            self._signal = None


def slurm_job_to_requeue() -> str:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` in a job array, else the job's."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this job; True if SLURM took it (the result is logged either way)."""
    log = logging.getLogger(__name__)
    job = slurm_job_to_requeue()
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except OSError as err:
        log.warning("Could not requeue SLURM job %s: %s", job, err)
        return False
    if result.returncode != 0:
        log.warning("scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr)
        return False
    log.info("Requeued SLURM job %s; it resumes from checkpoints/last.ckpt", job)
    return True


class NonFiniteLossError(FloatingPointError):
    """A loss term or a gradient became NaN or infinite; the message names it and the step."""


class RunInterrupted(RuntimeError):
    """Training was stopped by a signal (SIGTERM); last.ckpt holds the state to resume from."""


class NonFiniteGuard(pl.Callback):
    """Stops training at the first NaN/inf loss or gradient, naming the term or parameter;
    with ``skip_nonfinite`` it skips such batches instead (no parameter update) and counts them
    (``skipped_batches``, written to metrics.json as ``train/skipped_batches``).

    The loss is checked before the backward pass; the term named is the first non-finite one
    of the model's ``guarded_terms`` in its ``step_terms``. Gradients are checked before the
    optimizer step (``check_gradients``), except under a gradient scaler
    (``trainer.precision=16-mixed``), whose inf gradients are how it finds its scale: it skips
    those steps and lowers the scale by design. The last good checkpoint stays in place.

    Hydra keys: ``callbacks.nonfinite_guard.skip_nonfinite`` (alias
    ``trainer_guard.skip_nonfinite``) and ``callbacks.nonfinite_guard.check_gradients``.
    """

    def __init__(self, skip_nonfinite: bool = False, check_gradients: bool = True) -> None:
        self.skip_nonfinite = skip_nonfinite
        self.check_gradients = check_gradients
        self.skipped_batches = 0
        self._skip_this_step = False
        self._parameters: list | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self._parameters = None

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if math.isfinite(loss.item()):  # one host sync a step
            return
        if self.skip_nonfinite:
            self._skip_this_step = True
            return
        terms = getattr(pl_module, "step_terms", {})
        culprit = next(
            (n for n in pl_module.guarded_terms if n in terms and not _finite(terms[n])), "loss"
        )
        value = float(terms.get(culprit, loss).detach().float().mean())
        raise NonFiniteLossError(
            f"non-finite {culprit} ({value}) at training step {trainer.global_step} (epoch "
            f"{trainer.current_epoch}). {self._advice(trainer, 'model.logvar_clamp=[-10,10], ')}"
        )

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_) -> None:
        """A non-finite validation term (a divergence on an epoch's last step, or a checkpoint
        with an inf weight) stops the run here, before the epoch's scalars, histograms and
        checkpoint are written with it."""
        terms = getattr(pl_module, "step_terms", {})
        culprit = next((n for n, v in terms.items() if not _finite(torch.as_tensor(v))), None)
        if culprit is not None:
            raise NonFiniteLossError(
                f"non-finite validation {culprit} ({float(terms[culprit])}) after training step "
                f"{trainer.global_step} (epoch {trainer.current_epoch}); nothing of this "
                f"validation was written. {self._advice(trainer, '')}"
            )

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self._skip_this_step and self.check_gradients and not _has_scaler(trainer):
            if self._parameters is None:  # listed once per fit
                self._parameters = list(pl_module.named_parameters())
            named = [(n, p.grad) for n, p in self._parameters if p.grad is not None]
            if named and not gradients_are_finite([g for _, g in named]):
                culprit = next(n for n, g in named if not _finite(g))
                if not self.skip_nonfinite:
                    raise NonFiniteLossError(
                        f"non-finite gradient of {culprit} at training step "
                        f"{trainer.global_step} (epoch {trainer.current_epoch}). "
                        + self._advice(trainer, "")
                    )
                self._skip_this_step = True
        if self._skip_this_step:
            self._skip_this_step = False
            self.skipped_batches += 1
            optimizer.zero_grad(set_to_none=True)  # the optimizer leaves grad-less params alone

    @staticmethod
    def _advice(trainer, extra: str) -> str:
        folders = {getattr(c, "dirpath", None) for c in trainer.checkpoint_callbacks}
        saved = any(list(Path(f).glob("*.ckpt")) for f in folders if f)
        kept = (
            "the last good checkpoint is kept in the run's checkpoints/ folder"
            if saved
            else "no checkpoint had been written yet"
        )
        return (
            f"Training stopped; {kept}. Try a lower model.lr, trainer.gradient_clip_val=1.0, "
            f"{extra}or trainer_guard.skip_nonfinite=true to skip such batches."
        )

    def state_dict(self) -> dict:
        return {"skipped_batches": self.skipped_batches}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_batches = int(state_dict.get("skipped_batches", 0))


def gradients_are_finite(gradients: list[torch.Tensor]) -> bool:
    """True when every entry of every tensor in the non-empty list is finite.

    NaN and inf propagate through sums, so a finite total proves every entry finite with one
    host sync; only a non-finite total (which ``inf - inf`` or an overflow of huge finite values
    could also give) pays for the elementwise search.
    """
    total = torch.stack([g.sum() for g in gradients]).sum()  # ~60 us for a 0.8M-weight MLP
    return _finite(total) or all(_finite(g) for g in gradients)


def _finite(value: torch.Tensor) -> bool:
    return bool(torch.isfinite(value).all())


def _has_scaler(trainer) -> bool:
    return getattr(trainer.precision_plugin, "scaler", None) is not None
