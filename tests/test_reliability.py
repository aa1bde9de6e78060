"""Reliability as it fails in practice: resume, SIGKILL, NaN, concurrency, determinism.

Every test drives the real `vae-train` in subprocesses and reads the results back with
TensorBoard's own event reader.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.cli import (
    BIN,
    QUICK,
    TIMINGS,
    last_line,
    load_events,
    read_metrics,
    run_cli,
    run_stopped_by_nan,
    run_with_nan,
    scalar_series,
    without_timings,
)
from vae.training import tags
from vae.training.checkpoints import AtomicCheckpointIO, read_checkpoint, remove_stale_temporaries

pytestmark = pytest.mark.slow


def _assert_contiguous(steps: list[int], every: int = 1) -> None:
    assert steps == sorted(set(steps)), f"duplicated or out-of-order steps: {steps}"
    gaps = [(a, b) for a, b in zip(steps, steps[1:], strict=False) if b - a != every]
    assert not gaps, f"gaps in the curve: {gaps}"


def test_stop_after_2_epochs_and_resume_to_4_equals_4_straight(tmp_path: Path):
    common = ["seed=11", "trainer.deterministic=true", "trainer.log_every_n_steps=1", *QUICK]
    first = tmp_path / last_line(
        run_cli("vae-train", "trainer.max_epochs=2", *common, cwd=tmp_path).stdout
    )
    checkpoint = first / "checkpoints" / "last.ckpt"
    # What a writer killed mid-save leaves (see the SIGKILL test, which hits it only by chance).
    stale = first / "checkpoints" / ".last.ckpt.k1ll3d.tmp"
    stale.write_bytes(b"PK\x03\x04 half a zip")
    resumed = run_cli(
        "vae-train", "trainer.max_epochs=4", f"ckpt_path={checkpoint}", *common, cwd=tmp_path
    )
    assert Path(last_line(resumed.stdout)) == first.resolve(), "resume must reuse the run dir"
    assert not stale.exists(), "the resumed run must remove the killed writer's temporary"
    straight = tmp_path / last_line(
        run_cli("vae-train", "trainer.max_epochs=4", *common, cwd=tmp_path).stdout
    )

    a, b = read_metrics(first), read_metrics(straight)
    assert a.keys() == b.keys()
    worst = max(abs(a[k] - b[k]) for k in a if k not in TIMINGS)
    assert worst <= 1e-6, {k: (a[k], b[k]) for k in a if k not in TIMINGS and a[k] != b[k]}
    assert a["global_step"] == 4 * 23

    events = load_events(first)
    steps = [s for s, _ in scalar_series(events, tags.TRAIN_LOSS)]
    _assert_contiguous(steps)
    assert steps[0] == 1 and steps[-1] == 4 * 23
    assert len(scalar_series(events, tags.VAL_ELBO)) == 4
    # .hydra/config.yaml is the latest attempt's config, where tools read it; the first
    # attempt's stays in .hydra/first/, and the resume attempt has its own record.
    assert "max_epochs: 4" in (first / ".hydra" / "config.yaml").read_text()
    assert "max_epochs: 2" in (first / ".hydra" / "first" / "config.yaml").read_text()
    assert len(list((first / ".hydra").glob("resume_*/config.yaml"))) == 1


def _wait_for_checkpoint(path: Path, min_step: int, proc: subprocess.Popen, timeout=120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "training ended before it could be killed"
        if path.exists():
            try:
                step = read_checkpoint(path)["global_step"]
            except Exception:  # being replaced right now; atomic rename makes this rare
                step = -1
            if step >= min_step:
                return step
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint with step >= {min_step} after {timeout}s")


def test_remove_stale_temporaries_touches_only_checkpoint_temporaries(tmp_path: Path):
    AtomicCheckpointIO().save_checkpoint(
        {"state_dict": {}, "global_step": 3}, tmp_path / "last.ckpt"
    )
    for name in [".last.ckpt.a1.tmp", ".best-epoch=1.ckpt.b2.tmp", ".metrics.c3.tmp", "notes.tmp"]:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [".best-epoch=1.ckpt.b2.tmp", ".last.ckpt.a1.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".metrics.c3.tmp",
        "last.ckpt",
        "notes.tmp",
    ]
    assert read_checkpoint(tmp_path / "last.ckpt")["global_step"] == 3


def test_sigkill_at_a_random_point_then_resume_has_no_gaps(tmp_path: Path):
    logs = tmp_path / "logs"
    args = [
        "trainer.max_epochs=1000",
        "seed=5",
        "trainer.log_every_n_steps=1",
        "callbacks.last_checkpoint.every_n_train_steps=7",
        *QUICK,
    ]
    proc = subprocess.Popen(
        [str(BIN / "vae-train"), *args],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        run_dirs = []
        deadline = time.time() + 60
        while not run_dirs and time.time() < deadline:
            run_dirs = list(logs.glob("vae_digits/*/"))
            time.sleep(0.1)
        checkpoint = run_dirs[0] / "checkpoints" / "last.ckpt"
        _wait_for_checkpoint(checkpoint, min_step=30, proc=proc)
        time.sleep(random.uniform(0.0, 1.5))  # a random point, possibly mid-save
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = read_checkpoint(checkpoint)  # loadable despite the kill
    # One epoch past the checkpoint's: if the kill came just after an epoch-end save, that
    # epoch is complete, and resuming to its end would leave nothing to train.
    final_epochs = saved["epoch"] + 2
    run_cli(
        "vae-train",
        f"trainer.max_epochs={final_epochs}",
        f"ckpt_path={checkpoint}",
        *args[1:],
        cwd=tmp_path,
    )
    run_dir = run_dirs[0]
    assert not list(run_dir.glob("checkpoints/.*.tmp")), "no half-written files may remain"
    metrics = read_metrics(run_dir)
    assert metrics["global_step"] == final_epochs * 23
    events = load_events(run_dir)
    steps = [s for s, _ in scalar_series(events, tags.TRAIN_LOSS)]
    _assert_contiguous(steps)
    assert steps[-1] == final_epochs * 23
    val_steps = [s for s, _ in scalar_series(events, tags.VAL_ELBO)]
    assert val_steps == sorted(set(val_steps)) and len(val_steps) == final_epochs
    # Mid-epoch resume is exact too: same data order, binarization noise and RNG streams.
    straight = tmp_path / last_line(
        run_cli("vae-train", f"trainer.max_epochs={final_epochs}", *args[1:], cwd=tmp_path).stdout
    )
    a, b = metrics, read_metrics(straight)
    assert without_timings(a) == without_timings(b)


def test_injected_nan_stops_with_term_and_step(tmp_path: Path):
    args = ["trainer.max_epochs=3", "callbacks.last_checkpoint.every_n_train_steps=10"]
    proc, run_dir = run_stopped_by_nan(tmp_path, "kl", 30, *args)
    assert "non-finite kl" in proc.stderr and "training step 30" in proc.stderr
    assert "Traceback" not in proc.stderr
    saved = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 30  # the last good state, from just before the NaN
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values())


def test_skip_nonfinite_skips_and_counts_the_batch(tmp_path: Path):
    # The old spelling trainer_guard.skip_nonfinite is an alias of the callback's key.
    proc = run_with_nan(
        tmp_path, "recon", 10, "trainer.max_epochs=2", "trainer_guard.skip_nonfinite=true"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = read_metrics(tmp_path / last_line(proc.stdout))
    assert metrics[tags.TRAIN_SKIPPED_BATCHES] == 1
    # The skipped batch updates no parameter (its gradients are dropped); Lightning still
    # counts the step it called.
    assert metrics["global_step"] == 2 * 23
    assert all(v == v for v in metrics.values())  # no NaN reached the metrics


def test_two_runs_started_together_get_distinct_intact_directories(tmp_path: Path):
    args = [str(BIN / "vae-train"), "trainer.max_epochs=2", "seed=1", *QUICK]
    procs = [
        subprocess.Popen(
            args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-1500:] for _, e in outputs]
    run_dirs = [tmp_path / last_line(out) for out, _ in outputs]
    assert run_dirs[0] != run_dirs[1]
    for run_dir in run_dirs:
        assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
        assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 46
        assert read_metrics(run_dir)["global_step"] == 46
    a, b = (read_metrics(d) for d in run_dirs)
    assert without_timings(a) == without_timings(b)


def assert_threads_shared(run_dir: Path, processes: int, joblib: bool = False) -> None:
    """train.log says how many torch threads the run took: at most its share of the cores."""
    from joblib import cpu_count

    share = max(cpu_count() // processes, 1)
    line = re.search(r"Intra-op threads: (\d+) \((.*?)\)", (run_dir / "train.log").read_text())
    assert line is not None and int(line[1]) <= share, line
    # The user's OMP_NUM_THREADS is kept; the one joblib gives its jobs (cores // n_jobs) is not.
    omp = os.environ.get("OMP_NUM_THREADS")
    if omp is None or (joblib and omp == str(share)):
        assert f"shared by {processes} parallel processes" in line[2], line


def test_parallel_multirun_with_joblib(tmp_path: Path):
    run_cli(
        "vae-train",
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "model.beta=1,2",
        "trainer.max_epochs=1",
        *QUICK,
        cwd=tmp_path,
    )
    metrics = sorted((tmp_path / "logs").rglob("metrics.json"))
    assert len(metrics) == 2
    assert sorted(json.loads(p.read_text())[tags.TRAIN_BETA] for p in metrics) == [1.0, 2.0]
    for path in metrics:  # the 2 jobs share the cores (auto threads; train.log says so)
        assert_threads_shared(path.parent, 2, joblib=True)


def test_deterministic_runs_are_bitwise_equal(tmp_path: Path):
    args = [
        "trainer.max_epochs=2",
        "seed=4",
        "trainer.deterministic=true",
        "model.arch=conv",
        "model.hidden_dims=[8,16]",
        *QUICK,
    ]
    first, second = (
        read_metrics(tmp_path / last_line(run_cli("vae-train", *args, cwd=tmp_path).stdout))
        for _ in range(2)
    )
    for metrics in (first, second):
        metrics.pop(tags.TRAIN_SAMPLES_PER_S)
    assert first == second


def test_ddp_on_two_cpu_processes_writes_one_run(tmp_path: Path):
    proc = run_cli("vae-train", "trainer=ddp_cpu", "trainer.max_epochs=1", *QUICK, cwd=tmp_path)
    assert proc.stdout.count("tensorboard --logdir") == 1
    run_dirs = [p.parent for p in (tmp_path / "logs").rglob("metrics.json")]
    assert len(run_dirs) == 1 and run_dirs[0] == tmp_path / last_line(proc.stdout)
    metrics = read_metrics(run_dirs[0])
    # 1437 training digits split over 2 processes: 12 steps of 64 per process.
    assert metrics["global_step"] == 12
    # The KL decomposition gathers both processes' posteriors: its terms add up to the synced
    # val/kl (one process's half of the split would not).
    parts = sum(metrics[tag] for tag in ("val/mutual_info", "val/total_correlation"))
    assert parts + metrics["val/dimwise_kl"] == pytest.approx(metrics["val/kl"], rel=1e-4, abs=1e-6)
    assert len(list(run_dirs[0].glob("events.out.tfevents.*"))) == 1
    assert_threads_shared(run_dirs[0], 2)  # the 2 processes share the cores
