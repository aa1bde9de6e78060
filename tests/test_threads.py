"""The choice of torch's intra-op threads (`threads` key, `vae.training.threads`).

The choosing function is pure: its inputs (cores, parallel jobs, busy cores, the key,
OMP_NUM_THREADS) are faked here. The measuring side is checked against a real busy process,
and the wiring through a real `vae-train` (train.log); the joblib sweep and DDP runs of
tests/test_reliability.py check the parallel cases end to end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.cli import QUICK, last_line, run_cli
from vae.training import threads
from vae.training.config import ConfigError, validate_config
from vae.training.threads import choose_threads, cpu_jiffies


def count(setting="auto", **inputs) -> int:
    return choose_threads(setting, **inputs).threads


def test_one_job_on_an_idle_machine_uses_every_core():
    assert count(cores=2) == 2
    assert count(cores=16, busy=0.2) == 16


def test_the_parallel_jobs_of_a_sweep_share_the_cores():
    assert count(cores=2, jobs=2) == 1
    assert count(cores=16, jobs=4) == 4
    assert count(cores=16, jobs=3) == 5  # the remainder stays idle rather than oversubscribed
    assert count(cores=2, jobs=8) == 1  # never 0
    assert (
        "2 cores shared by 2 parallel processes" in choose_threads("auto", cores=2, jobs=2).reason
    )


def test_cores_busy_with_other_processes_are_left_to_them():
    # The case: 2 cores, one other busy process: 1 thread (measured 6x faster than 2).
    assert count(cores=2, busy=0.97) == 1
    assert count(cores=2, busy=2.0) == 1  # everything busy: still one thread
    assert count(cores=16, busy=3.4) == 13
    # a sweep's share is also capped by the idle cores, and the reverse
    assert count(cores=16, jobs=4, busy=14.0) == 2
    assert count(cores=16, jobs=4, busy=3.0) == 4
    reason = choose_threads("auto", cores=2, busy=0.97).reason
    assert "1.0 busy with other processes" in reason


def test_a_part_busy_core_counts_from_half_busy():
    assert count(cores=2, busy=0.4) == 2
    assert count(cores=2, busy=0.6) == 1


def test_an_explicit_key_wins_over_everything():
    choice = choose_threads(3, cores=2, jobs=2, busy=1.9, omp_num_threads="1")
    assert choice.threads == 3 and choice.reason == "threads=3"


def test_omp_num_threads_set_by_the_user_wins_over_auto():
    choice = choose_threads("auto", cores=16, jobs=4, busy=12.0, omp_num_threads="6")
    assert choice.threads == 6
    assert "OMP_NUM_THREADS=6" in choice.reason
    assert count(cores=2, omp_num_threads="4,2") == 4  # OpenMP's nested form: the outer level


@pytest.mark.parametrize("unusable", ["", "0", "-2", "many"])
def test_an_unusable_omp_num_threads_is_ignored(unusable):
    assert count(cores=4, jobs=2, omp_num_threads=unusable) == 2


def test_the_key_is_validated_by_name():
    for bad in (0, -1, "four", 1.5, True):
        with pytest.raises(ConfigError, match=r"threads=.* is invalid: expected auto or a pos"):
            validate_config(OmegaConf.create({"threads": bad}))
    for good in ("auto", 1, 8):
        validate_config(OmegaConf.create({"threads": good}))


# --- measuring ------------------------------------------------------------------------------
STAT = """cpu  300 0 100 600 0 0 0 0 0 0
cpu0 100 0 50 350 0 0 0 0 0 0
cpu1 200 0 50 250 0 0 0 0 0 0
cpu2 0 0 0 0 0 0 0 0 0 0
intr 1 2 3
"""


def test_cpu_jiffies_counts_only_the_cores_given():
    # busy = user + nice + system + irq + softirq + steal; idle and iowait are not busy
    assert cpu_jiffies(STAT, {0, 1}) == (400, 1000)
    assert cpu_jiffies(STAT, {1}) == (250, 500)
    line = "cpu0 10 1 2 30 40 3 4 5 99 99"  # guest columns (already in user) are not added
    assert cpu_jiffies(line, {0}) == (25, 95)


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads Linux's /proc/stat")
def test_busy_cores_sees_a_busy_process():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert threads.busy_cores(0.5) >= 0.7
    finally:
        spinner.kill()
        spinner.wait()


# --- applying -----------------------------------------------------------------------------------
@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"


@pytest.fixture
def joblib_sweep_of(monkeypatch):
    """Make this process look like a job of a Hydra joblib sweep with ``n_jobs``."""

    def configure(n_jobs):
        launcher = {"_target_": JOBLIB, "n_jobs": n_jobs}
        monkeypatch.setattr(threads, "_hydra_launcher", lambda: launcher)

    return configure


def test_parallel_jobs_follow_the_joblib_launcher():
    from joblib import cpu_count

    assert threads.parallel_jobs() == 1  # no Hydra: a plain run
    assert threads.parallel_jobs({"_target_": JOBLIB, "n_jobs": 2}) == 2
    assert threads.parallel_jobs({"_target_": JOBLIB, "n_jobs": -1}) == cpu_count()  # per core
    basic = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    assert threads.parallel_jobs({"_target_": basic}) == 1  # one job at a time


def test_apply_sets_torch_and_says_why(monkeypatch, restore_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    line = threads.apply_threads("auto")
    assert torch.get_num_threads() == 1
    assert line.startswith("Intra-op threads: 1 (OMP_NUM_THREADS=1 from the environment)")
    assert threads.apply_threads(2).startswith("Intra-op threads: 2 (threads=2)")
    assert torch.get_num_threads() == 2


def test_joblibs_own_omp_num_threads_is_refined(monkeypatch, restore_threads, joblib_sweep_of):
    # joblib's workers get OMP_NUM_THREADS = cores // n_jobs unless the user set one: that is
    # joblib's guess, so auto decides (and may leave busy cores alone); another value is the
    # user's and is kept.
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    monkeypatch.setattr(threads, "busy_cores", lambda seconds=0.2: 7.0)
    monkeypatch.setattr(threads, "_joblib_default", lambda jobs: str(8 // jobs))
    joblib_sweep_of(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    line = threads.apply_threads("auto")
    assert line.startswith("Intra-op threads: 1 (auto: 8 cores shared by 2 parallel processes")
    assert "joblib's OMP_NUM_THREADS=4 for its jobs not used" in line
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.apply_threads("auto").startswith("Intra-op threads: 3 (OMP_NUM_THREADS=3")


def test_processes_of_one_run_share_the_cores_and_pass_it_on(monkeypatch, restore_threads):
    # DDP: Lightning's launcher keeps an OMP_NUM_THREADS it finds and hands it to its processes.
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    monkeypatch.setattr(threads, "busy_cores", lambda seconds=0.2: 0.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "")  # so that monkeypatch restores it afterwards
    monkeypatch.delenv("OMP_NUM_THREADS")
    line = threads.apply_threads("auto", processes=2)
    assert line.startswith("Intra-op threads: 4 (auto: 8 cores shared by 2 parallel processes")
    assert torch.get_num_threads() == 4
    assert os.environ["OMP_NUM_THREADS"] == "4"


def test_vae_train_and_vae_eval_say_what_they_chose(tmp_path: Path):
    proc = run_cli(
        "vae-train",
        "threads=1",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        *QUICK,
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "2"},
    )
    run_dir = tmp_path / last_line(proc.stdout)
    assert (
        "Intra-op threads: 1 (threads=1); set them with threads=N"
        in (run_dir / "train.log").read_text()
    )
    evaluation = run_cli(
        "vae-eval", f"ckpt_path={run_dir}", "threads=1", "eval.k=2", "eval.limit=8", cwd=tmp_path
    )
    assert "vae-eval: Intra-op threads: 1 (threads=1)" in evaluation.stderr
    bad = run_cli("vae-eval", f"ckpt_path={run_dir}", "threads=0", cwd=tmp_path, check=False)
    assert bad.returncode == 2
    assert "threads=0 is invalid: expected auto or a positive integer" in bad.stderr
