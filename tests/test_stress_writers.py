"""Stress: three writers race to resume one run, and the one that wins is killed.

Each round starts three resumes of the run's ``last.ckpt`` together. One takes the run's lock
(``vae.training.runs.RunLock``); the other two must be refused, naming it. The winner is then
sent SIGKILL or SIGTERM at a random moment (in its set-up, mid-epoch, mid-save, in a
validation, after its fit) or left to finish; after a SIGKILL the next round's three racers
find its stale lock and race to take it over. A last, clean resume finishes the run, which
must then read as if it had been trained in one go: every checkpoint loads, one best-*, no
half-written file, and TensorBoard curves with no gap and no duplicated step.

The rounds are drawn from a seeded ``random.Random``; a failure names the seed. Other seeds:
``VAE_STRESS_SEEDS=1,2,3 pytest tests/test_stress_writers.py``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cli import QUICK, load_events, read_metrics, run_cli, scalar_series
from tests.test_writers import _resume
from vae.models import GaussianVAE
from vae.training import tags
from vae.training.checkpoints import read_checkpoint
from vae.training.runs import LOCK_FILE

pytestmark = pytest.mark.slow

SEEDS = [int(s) for s in os.environ.get("VAE_STRESS_SEEDS", "7").split(",")]
ROUNDS = 3
RACERS = 3
# Step checkpoints every 7 steps (several an epoch, so kills land mid-save too), and train/*
# logged at every step, so that one missing or repeated step shows in the curve.
OVERRIDES = ["trainer.log_every_n_steps=1", "callbacks.last_checkpoint.every_n_train_steps=7"]
# The signal comes up to SIGNAL_WITHIN seconds after the other racers are refused (not before:
# one of them would take over a SIGKILLed winner's lock in the same round). The winner trains a
# random number of epochs (~0.2 s each on digits, slower under load), so that the moment falls
# in its set-up, its fit (mid-step, mid-save, in a validation) or, now and then, after it.
SIGNAL_WITHIN = 2.0
MAX_EXTRA_EPOCHS = 40
# Exit codes of the winner. SIGTERM in the fit stops at a step boundary with 143; before the
# fit has installed Lightning's handler, or after the fit has restored Python's default, the
# process dies of the signal (-15, which a shell also reports as 143). A signal that comes too
# late for the fit to notice leaves a finished run (0).
EXPECTED_EXIT = {"SIGKILL": {-9, 0}, "SIGTERM": {143, -signal.SIGTERM, 0}, "finish": {0}}


def _plan(rng: random.Random) -> list[str]:
    """What each round does to its winner: both signals at least once, in a random order."""
    actions = ["SIGKILL", "SIGTERM", *rng.choices(["SIGKILL", "SIGTERM", "finish"], k=ROUNDS - 2)]
    rng.shuffle(actions)
    return actions


@dataclass
class Round:
    action: str
    delay: float  # seconds after the other racers were refused
    max_epochs: int
    exit_code: int
    step_before: int
    step_after: int
    holder: int


def _start_racers(run_dir: Path, epochs: list[int], logs: Path) -> list[subprocess.Popen]:
    """The racing resumes, started together; their output goes to files in ``logs``."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONHASHSEED": "0"}
    procs = []
    for i, max_epochs in enumerate(epochs):
        with (logs / f"racer{i}.out").open("w") as out, (logs / f"racer{i}.err").open("w") as err:
            procs.append(
                subprocess.Popen(
                    _resume(run_dir, max_epochs, *OVERRIDES),
                    cwd=run_dir.parents[2],
                    env=env,
                    stdout=out,
                    stderr=err,
                )
            )
    return procs


def _lock_holder(run_dir: Path, procs: list[subprocess.Popen], timeout: float = 120) -> int:
    """The index in ``procs`` of the racer whose pid the run's lock file names, once it does."""
    pids = {p.pid: i for i, p in enumerate(procs)}
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            pid = json.loads((run_dir / LOCK_FILE).read_text())["pid"]
        except (OSError, ValueError, KeyError):
            pid = None  # no lock yet, a stale one being replaced, or one being written
        if pid in pids:
            return pids[pid]
        if all(p.poll() is not None for p in procs):
            break
        time.sleep(0.02)
    raise AssertionError(f"no racer took the lock; exit codes {[p.poll() for p in procs]}")


def _kill_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _step(run_dir: Path) -> int:
    return int(read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"])


def _race_round(
    run_dir: Path, per_epoch: int, action: str, rng: random.Random, logs: Path, where: str
) -> Round:
    """One round: three racing resumes, the winner sent ``action`` at a random moment."""
    step_before = _step(run_dir)
    # From the checkpoint's epoch + 2: a checkpoint saved at an epoch's end holds that epoch
    # done, and a resume to its end would have nothing to train.
    first = int(read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["epoch"]) + 2
    first += rng.randint(0, 2 if action == "finish" else MAX_EXTRA_EPOCHS)
    epochs = [first + i for i in range(RACERS)]  # distinct: a finished run tells who won
    delay = rng.uniform(0.0, SIGNAL_WITHIN)
    logs.mkdir()
    procs = _start_racers(run_dir, epochs, logs)
    try:
        holder = _lock_holder(run_dir, procs)
        for i, proc in enumerate(procs):
            if i != holder:
                proc.wait(timeout=120)
        time.sleep(delay)
        if action != "finish":
            procs[holder].send_signal(getattr(signal, action))  # nothing if it has exited
        procs[holder].wait(timeout=300)
    finally:
        _kill_all(procs)
    err = {i: (logs / f"racer{i}.err").read_text() for i in range(RACERS)}
    where = f"{where}: {action} {delay:.2f}s after racer{holder}'s rivals were refused ({logs})"
    for i, proc in enumerate(procs):
        if i == holder:
            continue
        assert proc.returncode == 2, f"{where}; racer{i} was not refused:\n{err[i][-3000:]}"
        assert f"being written by pid {procs[holder].pid} " in err[i], f"{where}\n{err[i]}"
        assert "Traceback" not in err[i], f"{where}\n{err[i][-3000:]}"
    code = procs[holder].returncode
    assert code in EXPECTED_EXIT[action], f"{where}; exit {code}\n{err[holder][-3000:]}"
    step_after = _step(run_dir)  # loads, whatever the signal interrupted
    assert step_after >= step_before, f"{where}; last.ckpt went back from step {step_before}"
    if code == 0:
        assert step_after == epochs[holder] * per_epoch, f"{where}; step {step_after}"
    if code == 143:
        line = next((x for x in err[holder].splitlines() if "stopped by SIGTERM" in x), "")
        assert f"holds step {step_after}." in line, f"{where}; {line}"
    if code in (0, 143):
        assert not (run_dir / LOCK_FILE).exists(), f"{where}; the lock outlived its writer"
    return Round(action, delay, epochs[holder], code, step_before, step_after, procs[holder].pid)


@pytest.mark.parametrize("seed", SEEDS)
def test_racing_resumes_killed_at_random_leave_one_intact_run(tmp_path: Path, seed: int):
    rng = random.Random(seed)
    base = run_cli("vae-train", "trainer.max_epochs=1", "seed=2", *OVERRIDES, *QUICK, cwd=tmp_path)
    (run_dir,) = (tmp_path / "logs" / "vae_digits").iterdir()
    assert base.stdout.strip().endswith(run_dir.name)
    per_epoch = read_metrics(run_dir)["global_step"]  # optimizer steps in one epoch

    rounds = [
        _race_round(
            run_dir, per_epoch, action, rng, tmp_path / f"round{r}", f"seed {seed} round {r}"
        )
        for r, action in enumerate(_plan(rng))
    ]
    history = f"seed {seed}: " + "; ".join(
        f"{r.action} at +{r.delay:.2f}s (to {r.max_epochs} epochs): exit {r.exit_code}, "
        f"step {r.step_before}->{r.step_after}"
        for r in rounds
    )
    print(history)

    # A clean resume finishes the run.
    final_epochs = int(read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["epoch"]) + 2
    final = subprocess.run(
        _resume(run_dir, final_epochs, *OVERRIDES),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert final.returncode == 0, f"{history}\n{final.stderr[-3000:]}"

    # One writer per attempt: the attempts' records (.hydra/resume_<time>_<pid> and its log)
    # are the winners' and the final resume's; the refused racers left none.
    attempts = _attempt_pids(run_dir)
    assert len(attempts) == ROUNDS + 1 and {r.holder for r in rounds} < attempts, history
    assert not (run_dir / LOCK_FILE).exists(), history

    checkpoints = run_dir / "checkpoints"
    assert len(list(checkpoints.glob("best-*.ckpt"))) == 1, sorted(checkpoints.iterdir())
    leftovers = list(run_dir.rglob(".*.tmp"))
    assert not leftovers, f"{history}: half-written files remain: {leftovers}"
    for path in checkpoints.glob("*.ckpt"):
        saved = read_checkpoint(path)  # torch.load(weights_only=False), refusing a damaged file
        model = GaussianVAE.load_from_checkpoint(path, map_location="cpu")
        assert model.state_dict().keys() == saved["state_dict"].keys(), path

    total = final_epochs * per_epoch
    assert read_metrics(run_dir)["global_step"] == total, history
    assert _step(run_dir) == total, history
    # A step missing at a multiple of 7 would mean a step save got ahead of its events (fixed:
    # LastCheckpoint publishes a step save only once Lightning has logged that step; see
    # test_writers.py::test_a_sigkill_right_after_a_step_save_leaves_no_gap_in_the_curve).
    events = load_events(run_dir)
    for tag, expected in [
        (tags.TRAIN_LOSS, range(1, total + 1)),  # logged at every step
        (tags.VAL_ELBO, range(per_epoch, total + 1, per_epoch)),  # at every epoch's end
    ]:
        steps = [step for step, _ in scalar_series(events, tag)]
        assert steps == list(expected), f"{history}\n{tag}: {_curve_problems(steps, expected)}"


def _curve_problems(steps: list[int], expected: range) -> str:
    """What is wrong with a curve's steps: gaps, duplicates, steps out of order or unexpected."""
    seen = Counter(steps)
    return (
        f"missing {sorted(set(expected) - set(seen))}, "
        f"duplicated {sorted(s for s, n in seen.items() if n > 1)}, "
        f"unexpected {sorted(set(seen) - set(expected))}, "
        f"in order {steps == sorted(steps)}"
    )


def _attempt_pids(run_dir: Path) -> set[int]:
    """The pids of the attempts that recorded themselves in a resumed run: its
    ``.hydra/resume_<time>_<pid>`` folders, which must match its ``train_resume_*`` logs."""
    folders = {int(p.name.rsplit("_", 1)[1]) for p in (run_dir / ".hydra").glob("resume_*")}
    logs = {int(p.stem.rsplit("_", 1)[1]) for p in run_dir.glob("train_resume_*.log")}
    assert folders == logs, (sorted(folders), sorted(logs))
    return folders
