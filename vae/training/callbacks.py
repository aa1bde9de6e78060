"""Lightning callbacks of this project."""

from __future__ import annotations

import os
import random
import time

import lightning.pytorch as pl
import numpy as np
import torch


def examples_in(batch) -> int:
    """Examples in a training batch ``(x, y)`` (``x`` a tensor), or in a pack of such batches
    (a list of them; see ``LatentVariableModule.configure_loop``)."""
    if isinstance(batch[0], torch.Tensor):
        return int(batch[0].shape[0])
    return sum(int(x.shape[0]) for x, *_ in batch)


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
        self.samples += examples_in(batch)

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


class LastCheckpoint(pl.Callback):
    """Keeps ``<dirpath>/last.ckpt`` the latest state: after every training epoch (after its
    validation) and every ``every_n_train_steps`` optimizer steps.

    Lightning's ``ModelCheckpoint(save_last=True)`` refreshes ``last.ckpt`` only when it also
    saved a top-k checkpoint at that step, so once ``val/elbo`` stops improving its
    ``last.ckpt`` falls behind the run. Writes go through the trainer (rank 0, the atomic
    checkpoint IO of ``vae.training.checkpoints``).
    """

    FILENAME = "last.ckpt"

    def __init__(self, dirpath: str, every_n_train_steps: int | None = 200) -> None:
        self.dirpath = dirpath
        self.every_n_train_steps = every_n_train_steps or 0
        self._step_at_last_batch = 0

    @property
    def path(self) -> str:
        return os.path.join(self.dirpath, self.FILENAME)

    def _save(self, trainer) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        trainer.save_checkpoint(self.path)

    def on_train_start(self, trainer, pl_module) -> None:
        self._step_at_last_batch = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # A batch may take several optimizer steps (``train_loop.steps_per_call``): save when
        # it crossed a multiple of N, which with one step per batch means at each multiple.
        step, before = trainer.global_step, self._step_at_last_batch
        self._step_at_last_batch = step
        every = self.every_n_train_steps
        if every and step // every > before // every:
            self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save(trainer)
