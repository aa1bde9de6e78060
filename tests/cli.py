"""Helpers to run the real console scripts in a subprocess and read their TensorBoard output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vae.training import runs, tags
from vae.training.runs import METRICS_FILE

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Overrides for test runs of vae-train: the CPU, and no progress bar in captured output.
QUICK = ["trainer.accelerator=cpu", "callbacks.progress_bar.refresh_rate=0"]
# vae-eval in seconds: 2 importance samples for 16 test examples, no sample scores.
QUICK_EVAL = ["eval.k=2", "eval.limit=16", "eval.sample_scores=false", "eval.device=cpu"]
# metrics.json entries that are timings; everything else repeats exactly between equal runs.
TIMINGS = {tags.TRAIN_SAMPLES_PER_S}


def run_cli(
    script: str,
    *args: str,
    cwd: Path,
    check: bool = True,
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run e.g. ``vae-train`` with ``args`` in ``cwd`` (``env``: extra variables); return the
    completed process."""
    # Without SLURM_*: inside a SLURM job, runs would be named by its id and resume each other.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env = {**inherited, "HYDRA_FULL_ERROR": "0", "PYTHONHASHSEED": "0", **(env or {})}
    proc = subprocess.run(
        [str(BIN / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{script} {' '.join(args)} failed ({proc.returncode}):\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
        )
    return proc


def last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1].strip()


def load_events(run_dir: Path) -> EventAccumulator:
    """All scalars, images, histograms and tensors of one run, via TensorBoard's own reader."""
    accumulator = EventAccumulator(
        str(run_dir),
        size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0},
    )
    accumulator.Reload()
    return accumulator


def scalar_series(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in events.Scalars(tag)]


def read_metrics(run_dir: Path) -> dict:
    """The run's ``metrics.json`` (``vae.training.runs.read_metrics``), which must exist."""
    assert (run_dir / METRICS_FILE).is_file(), f"no {METRICS_FILE} in {run_dir}"
    return runs.read_metrics(run_dir)


def without_timings(metrics: dict) -> dict:
    """``metrics`` without the entries that are wall-clock timings."""
    return {k: v for k, v in metrics.items() if k not in TIMINGS}


def run_with_nan(cwd: Path, term: str, step: int, *args: str) -> subprocess.CompletedProcess:
    """``vae-train`` with a NaN injected into ``term`` at training step ``step`` (by
    ``tests/inject_nan.py``, a monkeypatch), on the CPU; returns the completed process."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONHASHSEED": "0", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(REPO / "tests" / "inject_nan.py"), term, str(step), *args, *QUICK],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def run_stopped_by_nan(cwd: Path, term: str, step: int, *args: str):
    """``vae-train`` on digits with a NaN injected into ``term`` at ``step``, which must stop it
    (exit code 3). Returns the process and its run directory."""
    proc = run_with_nan(cwd, term, step, *args)
    assert proc.returncode == 3, proc.stderr[-2000:]
    return proc, next((cwd / "logs" / "vae_digits").iterdir())
