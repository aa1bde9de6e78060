"""Lightning callbacks of this project."""

from __future__ import annotations

import random
import time

import lightning.pytorch as pl
import numpy as np
import torch


class TrainThroughput(pl.Callback):
    """Training examples per second of wall time spent in training batches.

    The clock runs from the start of each training epoch to its end, paused while validation
    runs, so start-up, sanity checks and validation are excluded; data loading, forward,
    backward and optimiser steps are included. The result is ``samples_per_s`` (and is written
    to ``metrics.json`` as ``train_samples_per_s``).
    """

    def __init__(self) -> None:
        self.samples = 0
        self.seconds = 0.0
        self._started: float | None = None

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
        self._start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.samples += int(batch[0].shape[0])

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.training:
            self._stop()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.training and not trainer.sanity_checking:
            self._start()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
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
        state = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
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
        np.random.set_state(self._pending["numpy"])
        torch.set_rng_state(self._pending["torch"])
        if "cuda" in self._pending and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self._pending["cuda"])
        self._pending = None
