"""SLURM without a cluster: the signal path of a preempted job, and Hydra's submitit launcher.

A fake SLURM environment (``SLURM_JOB_ID`` and friends) makes Lightning pick its SLURM plugin,
and ``scontrol`` is a script on ``PATH`` that records its arguments."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.cli import BIN, QUICK, last_line, read_metrics, run_cli
from vae.training.checkpoints import read_checkpoint

SLURM_JOB = "4242"
# What sbatch sets for a one-task job, as far as Lightning's SLURMEnvironment reads it.
SLURM_ENV = {
    "SLURM_JOB_ID": SLURM_JOB,
    "SLURM_JOB_NAME": "vae",
    "SLURM_NTASKS": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "localhost",
}
EPOCHS = 30
STEPS_PER_EPOCH = 5
# Short epochs, so that the job is still running when the signal comes, and the restart ends
# soon after.
RUN = [
    f"trainer.max_epochs={EPOCHS}",
    f"trainer.limit_train_batches={STEPS_PER_EPOCH}",
    "trainer.limit_val_batches=1",
    "threads=1",
    *QUICK,
]


def _fake_scontrol(folder: Path) -> Path:
    """A ``scontrol`` that appends its arguments to ``<folder>/scontrol.log``; returns the log."""
    (folder / "bin").mkdir()
    script = folder / "bin" / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {folder / "scontrol.log"}\n')
    script.chmod(0o755)
    return folder / "scontrol.log"


def _wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("warning", [signal.SIGUSR1, signal.SIGTERM])
def test_preempted_slurm_job_saves_is_requeued_and_resumes_its_run(tmp_path: Path, warning):
    requeue_log = _fake_scontrol(tmp_path)
    env = {
        **os.environ,
        **SLURM_ENV,
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "HYDRA_FULL_ERROR": "0",
    }
    args = RUN
    first = subprocess.Popen(
        [str(BIN / "vae-train"), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        run_dirs = lambda: list((tmp_path / "logs" / "vae_digits").glob("slurm-*"))  # noqa: E731
        _wait_for(
            lambda: any((d / "checkpoints" / "last.ckpt").is_file() for d in run_dirs()),
            "the first epoch's last.ckpt",
        )
        first.send_signal(warning)
        _, stderr = first.communicate(timeout=120)
    finally:
        first.kill()
    # SIGUSR1: the job requeues itself and stops without waiting for SLURM's SIGTERM (a
    # SIGTERM that lands after the save finds the job's lock taken over by its restart).
    # Lightning's own SLURM handler would deadlock in the TensorBoard writer here.
    assert first.returncode == 143, stderr[-3000:]
    (run_dir,) = run_dirs()
    assert run_dir.name.startswith(f"slurm-{SLURM_JOB}_")
    saved = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    assert 0 < saved < EPOCHS * STEPS_PER_EPOCH
    if warning == signal.SIGTERM:  # a time limit or scancel: saved, but not requeued
        assert not requeue_log.exists()
        return  # its resume is a plain one (tests/test_writers.py)
    assert requeue_log.read_text().split() == ["requeue", SLURM_JOB]

    # The requeued job: same id and command line, one restart.
    proc = run_cli("vae-train", *args, cwd=tmp_path, env={**env, "SLURM_RESTART_COUNT": "1"})
    assert tmp_path / last_line(proc.stdout) == run_dir
    assert run_dirs() == [run_dir]
    metrics = read_metrics(run_dir)
    assert metrics["global_step"] == EPOCHS * STEPS_PER_EPOCH  # continued, not restarted
    assert list(run_dir.glob(".hydra/resume_*/config.yaml")), "not recorded as a resume"
    assert list(run_dir.glob("train_resume_*.log"))
    assert not list(run_dir.glob("hpc_ckpt_*.ckpt"))  # Lightning's handler did not run
    assert not (run_dir / ".writer.lock").exists()


# --- Hydra's submitit launcher (pip install -e ".[slurm]") --------------------------------------
@pytest.mark.slow
def test_two_jobs_through_submitit_local_complete_and_vae_compare_sees_them(tmp_path: Path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason='needs ".[slurm]"')
    sweep = [
        "-m",
        "hydra/launcher=submitit_local",
        "model.beta=1,2",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "threads=1",
        *QUICK,
    ]
    # The jobs run in fresh processes from a pickle of the composed config: the sweep
    # directory is named once, here, and each job's directory is its own.
    run_cli("vae-train", *sweep, cwd=tmp_path, timeout=300)
    (sweep_dir,) = (tmp_path / "logs" / "vae_digits").iterdir()
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert [job.name.split("_")[0] for job in jobs] == ["0", "1"]
    for job in jobs:
        assert read_metrics(job)["global_step"] == 2
        assert not (job / ".writer.lock").exists()  # each job's writer let go of its run
    proc = run_cli("vae-compare", "logs", cwd=tmp_path)
    assert "2 runs" in proc.stdout
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert sorted(row[1] for row in rows if row and row[0] in ("0", "1")) == ["1", "2"]
