"""A run directory has one writer at a time, and a run stopped by SIGTERM says so.

Resumes that race for one run: exactly one writes, the other is refused with a message naming
the holder, and the run is left as the winner wrote it. A lock left by a dead writer is taken
over. SIGTERM (a scheduler's, or `timeout`'s) exits 143, keeps last.ckpt and says how to resume.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.cli import BIN, QUICK, last_line, load_events, run_cli, scalar_series
from vae.training.checkpoints import read_checkpoint
from vae.training.runs import LOCK_FILE

pytestmark = pytest.mark.slow


@pytest.fixture
def finished_run(tmp_path: Path) -> Path:
    proc = run_cli("vae-train", "trainer.max_epochs=1", "seed=2", *QUICK, cwd=tmp_path)
    return tmp_path / last_line(proc.stdout)


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def _resume(run_dir: Path, epochs: int, *extra: str) -> list[str]:
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    return [
        str(BIN / "vae-train"),
        f"trainer.max_epochs={epochs}",
        "seed=2",
        f"ckpt_path={ckpt}",
        *extra,
        *QUICK,
    ]


def _run_resume(run_dir: Path, epochs: int, *extra: str) -> subprocess.CompletedProcess:
    """A resume of ``run_dir`` to ``epochs`` epochs, from the folder it was started in."""
    return subprocess.run(
        _resume(run_dir, epochs, *extra),
        cwd=run_dir.parents[2],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_live_writer_holds_the_run_and_a_second_is_refused_naming_it(finished_run: Path):
    (finished_run / LOCK_FILE).write_text(
        json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
    )
    before = _snapshot(finished_run)
    proc = _run_resume(finished_run, 2)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"being written by pid {os.getpid()} on host {socket.gethostname()}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _snapshot(finished_run) == before  # nothing written, nothing cleaned up


def test_a_dead_writers_lock_is_taken_over(finished_run: Path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (finished_run / LOCK_FILE).write_text(
        json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": 0})
    )
    proc = _run_resume(finished_run, 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_checkpoint(finished_run / "checkpoints" / "last.ckpt")["global_step"] == 2 * 23
    assert not (finished_run / LOCK_FILE).exists()


def test_two_racing_resumes_one_writes_the_other_is_refused(finished_run: Path):
    cwd = finished_run.parents[2]
    procs = [
        subprocess.Popen(
            _resume(finished_run, epochs, f"model.lr={lr}"),
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for epochs, lr in ((4, 0.001), (3, 0.01))
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    winner = 4 if results[0][0] == 0 else 3
    refused = next(err for code, err in results if code == 2)
    assert "being written by pid" in refused
    # The run is the winner's alone: its checkpoint, its metrics, one curve with no duplicate.
    assert read_checkpoint(finished_run / "checkpoints" / "last.ckpt")["global_step"] == winner * 23
    steps = [s for s, _ in scalar_series(load_events(finished_run), "val/elbo")]
    assert steps == [23 * e for e in range(1, winner + 1)]
    assert len(list((finished_run / "checkpoints").glob("best-*.ckpt"))) == 1
    assert not (finished_run / LOCK_FILE).exists()


def test_sigterm_exits_143_keeps_last_ckpt_and_says_how_to_resume(tmp_path: Path):
    proc = subprocess.Popen(
        [str(BIN / "vae-train"), "trainer.max_epochs=500", "seed=3", *QUICK],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not list(tmp_path.glob("logs/vae_digits/*/checkpoints/last.ckpt")):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    (run_dir,) = tmp_path.glob("logs/vae_digits/*")
    line = next(x for x in stderr.splitlines() if x.startswith("vae-train: stopped by SIGTERM"))
    step = int(line.split("holds step ")[1].split(".")[0])
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == step
    assert f"Resume with: vae-train ckpt_path={run_dir}" in line
    assert not (run_dir / LOCK_FILE).exists()
    # The resume it suggests (seed and the rest come from the run's record) continues that
    # run with no gap in its curve.
    epochs = step // 23 + 2
    run_cli("vae-train", f"ckpt_path={run_dir}", f"trainer.max_epochs={epochs}", cwd=tmp_path)
    steps = [s for s, _ in scalar_series(load_events(run_dir), "val/elbo")]
    assert steps == [23 * e for e in range(1, epochs + 1)]


def test_resuming_from_an_older_checkpoint_is_refused_unless_asked(finished_run: Path):
    checkpoints = finished_run / "checkpoints"
    older = checkpoints / "older.ckpt"
    older.write_bytes((checkpoints / "last.ckpt").read_bytes())  # step 23
    cwd = finished_run.parents[2]
    assert _run_resume(finished_run, 2).returncode == 0  # to step 46
    rollback = [str(BIN / "vae-train"), "trainer.max_epochs=2", "seed=2", f"ckpt_path={older}"]
    proc = subprocess.run([*rollback, *QUICK], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "step 23, but the run's last.ckpt is at step 46" in proc.stderr
    assert "rollback=true" in proc.stderr
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == 46  # untouched

    proc = subprocess.run(
        [*rollback, "rollback=true", *QUICK], cwd=cwd, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (
        read_checkpoint(checkpoints / "last-before-rollback-step000046.ckpt")["global_step"] == 46
    )
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == 46  # retrained 23 -> 46
    assert len(list(checkpoints.glob("best-*.ckpt"))) == 1


# --- the lock's own races, forced in-process (found by tests/test_stress_writers.py) -----------
def _acquire_in_thread(lock) -> tuple:
    """Start ``lock.acquire()`` in a thread; after 0.3 s say whether it is still waiting."""
    import threading

    from vae.training.runs import RunLockedError

    outcome: dict = {}

    def acquire():
        try:
            lock.acquire()
        except RunLockedError as err:
            outcome["refused"] = str(err)

    thread = threading.Thread(target=acquire)
    thread.start()
    thread.join(0.3)
    outcome["waited"] = thread.is_alive()
    return thread, outcome


def test_two_writers_taking_over_one_stale_lock_do_not_both_hold_it(tmp_path: Path):
    from vae.training.runs import RunLock

    dead = subprocess.Popen(["true"])
    dead.wait()
    holder = {"pid": dead.pid, "host": socket.gethostname(), "started": 0}
    (tmp_path / LOCK_FILE).write_text(json.dumps(holder))
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    judged, race = RunLock._is_stale, {}

    def judge_then_let_the_other_try(holder):
        stale = judged(holder)
        race["thread"], race["outcome"] = _acquire_in_thread(first)  # between check and take
        return stale

    second._is_stale = judge_then_let_the_other_try
    second.acquire()
    race["thread"].join()
    assert (first.held, second.held) == (False, True)
    assert race["outcome"]["waited"] and "being written by pid" in race["outcome"]["refused"]


def test_a_lock_file_not_yet_written_is_not_taken_for_a_stale_one(tmp_path: Path, monkeypatch):
    from vae.training import runs
    from vae.training.runs import RunLock

    first, second = RunLock(tmp_path), RunLock(tmp_path)
    fdopen, race = os.fdopen, {}

    def the_other_arrives_before_the_record(fd, *args, **kwargs):
        monkeypatch.setattr(runs.os, "fdopen", fdopen)
        race["thread"], race["outcome"] = _acquire_in_thread(second)
        return fdopen(fd, *args, **kwargs)

    monkeypatch.setattr(runs.os, "fdopen", the_other_arrives_before_the_record)
    first.acquire()
    race["thread"].join()
    assert (first.held, second.held) == (True, False)
    assert race["outcome"]["waited"] and "being written by pid" in race["outcome"]["refused"]


KILLED_RIGHT_AFTER_A_STEP_SAVE = """
import os, signal, sys
from experiments import train
from vae.training.callbacks import LastCheckpoint

save = LastCheckpoint._save

def save_then_die(self, trainer, *args):
    saved = save(self, trainer, *args)
    if trainer.global_step == 14:
        os.kill(os.getpid(), signal.SIGKILL)
    return saved

LastCheckpoint._save = save_then_die
sys.argv = ["vae-train", *sys.argv[1:]]
train.main()
"""


def test_a_sigkill_right_after_a_step_save_leaves_no_gap_in_the_curve(tmp_path: Path):
    from tests.cli import REPO

    every_step = ["trainer.log_every_n_steps=1", "callbacks.last_checkpoint.every_n_train_steps=7"]
    killed = subprocess.run(
        [str(BIN / "python"), "-c", KILLED_RIGHT_AFTER_A_STEP_SAVE, "trainer.max_epochs=2"]
        + ["seed=2", *every_step, *QUICK],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL
    (run_dir,) = tmp_path.glob("logs/vae_digits/*")
    run_cli("vae-train", f"ckpt_path={run_dir}", cwd=tmp_path)
    steps = [s for s, _ in scalar_series(load_events(run_dir), "train/loss")]
    assert steps == list(range(1, 47)), sorted(set(range(1, 47)) - set(steps))
