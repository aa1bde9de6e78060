"""The test/* numbers of one evaluation replace those of an earlier evaluation at the same step:
`vae-eval` twice on one checkpoint, or `vae-train test=true` then `vae-eval` on its last.ckpt,
leaves each test/* tag once at that step (scalars and the histogram); evaluations at other steps
stay. vae-eval holds the run's writer lock, and no writer puts non-finite test numbers into a
run."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.cli import QUICK, last_line, load_events, read_metrics, run_cli, run_with_nan
from vae.training import tags
from vae.training.runs import RunLock

pytestmark = pytest.mark.slow

# Each evaluation uses another number of examples, so its values differ from the others'.
TRAIN_EVAL = ["eval.k=8", "eval.limit=40", "eval.batch_size=20"]
FIRST_EVAL = ["eval.k=8", "eval.limit=30", "eval.batch_size=20", "eval.sample_scores=false"]
SECOND_EVAL = ["eval.k=8", "eval.limit=20", "eval.batch_size=20", "eval.sample_scores=false"]


def series_of_test_tags(events: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every ``test/*`` scalar in the run."""
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if tag.startswith("test/")
    }


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def evaluate(workdir: Path, ckpt: Path, settings: list[str]) -> dict:
    """``vae-eval`` of ``ckpt``; returns the test/* entries of metrics.json afterwards."""
    proc = run_cli("vae-eval", f"ckpt_path='{ckpt}'", *settings, cwd=workdir)
    run_dir = Path(last_line(proc.stdout))
    return {k: v for k, v in read_metrics(run_dir).items() if k.startswith("test/")}


def assert_once_per_tag(run_dir: Path, metrics: dict, step: int) -> None:
    """Every test/* number of ``metrics`` is in the run exactly once at ``step``, with its
    value; the run has no other test/* tag at ``step``."""
    events = load_events(run_dir)
    scalars = {
        tag: [value for s, value in series if s == step]
        for tag, series in series_of_test_tags(events).items()
    }
    numbers = {k: v for k, v in metrics.items() if not isinstance(v, list)}
    assert {tag for tag, values in scalars.items() if values} == set(numbers)
    for tag, value in numbers.items():
        assert len(scalars[tag]) == 1, (tag, scalars[tag])
        assert math.isclose(scalars[tag][0], float(value), rel_tol=1e-6, abs_tol=1e-6), tag
    histograms = [h for h in events.Histograms(tags.TEST_KL_PER_DIM) if h.step == step]
    assert len(histograms) == 1, [h.step for h in histograms]
    kl_per_dim = metrics[tags.TEST_KL_PER_DIM]
    assert histograms[0].histogram_value.num == len(kl_per_dim)
    assert math.isclose(histograms[0].histogram_value.sum, sum(kl_per_dim), rel_tol=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(working dir, run dir) of a 2-epoch digits run with ``test=true`` that keeps the
    checkpoint of every epoch (best-epoch000-step000023.ckpt, best-epoch001-step000046.ckpt)."""
    workdir = tmp_path_factory.mktemp("replace")
    proc = run_cli(
        "vae-train",
        "trainer.max_epochs=2",
        "test=true",
        "callbacks.model_checkpoint.save_top_k=-1",
        *TRAIN_EVAL,
        *QUICK,
        cwd=workdir,
    )
    return workdir, workdir / last_line(proc.stdout)


@pytest.fixture(scope="module")
def evaluated_once(trained) -> dict:
    """The test/* of metrics.json after one vae-eval of last.ckpt, which replaces the test
    numbers that ``vae-train test=true`` wrote at the same step."""
    workdir, run_dir = trained
    return evaluate(workdir, run_dir / "checkpoints" / "last.ckpt", FIRST_EVAL)


@pytest.fixture(scope="module")
def evaluated_twice(trained, evaluated_once) -> dict:
    workdir, run_dir = trained
    return evaluate(workdir, run_dir / "checkpoints" / "last.ckpt", SECOND_EVAL)


def test_eval_after_train_with_test_leaves_one_event_per_tag(trained, evaluated_once):
    _, run_dir = trained
    step = read_metrics(run_dir)["global_step"]
    assert step == 46
    assert evaluated_once[tags.TEST_NUM_EXAMPLES] == 30  # vae-eval's, not vae-train's 40
    assert_once_per_tag(run_dir, evaluated_once, step)


def test_a_second_eval_of_one_checkpoint_replaces_the_first(trained, evaluated_twice):
    _, run_dir = trained
    step = read_metrics(run_dir)["global_step"]
    assert evaluated_twice[tags.TEST_NUM_EXAMPLES] == 20
    assert_once_per_tag(run_dir, evaluated_twice, step)
    # The training curves are still there, once per step.
    events = load_events(run_dir)
    val_steps = [e.step for e in events.Scalars(tags.VAL_ELBO)]
    assert val_steps == sorted(set(val_steps)) and val_steps[-1] == step


def test_evals_of_checkpoints_at_different_steps_both_stay(trained, evaluated_twice):
    workdir, run_dir = trained
    (first_epoch,) = (run_dir / "checkpoints").glob("best-epoch000-step000023.ckpt")
    at_23 = evaluate(workdir, first_epoch, SECOND_EVAL)
    assert_once_per_tag(run_dir, at_23, 23)  # metrics.json holds the latest evaluation
    assert_once_per_tag(run_dir, evaluated_twice, 46)  # the evaluation at step 46 stays
    for series in series_of_test_tags(load_events(run_dir)).values():
        assert sorted(step for step, _ in series) == [23, 46]


def test_eval_is_refused_while_another_writer_holds_the_run(trained):
    workdir, run_dir = trained
    lock = RunLock(run_dir).acquire()  # this test process is the live writer
    try:
        before = snapshot(run_dir)
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        proc = run_cli("vae-eval", f"ckpt_path='{ckpt}'", *FIRST_EVAL, cwd=workdir, check=False)
        assert snapshot(run_dir) == before
    finally:
        lock.release()
    assert proc.returncode == 2, proc.stderr[-2000:]
    message = proc.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert message.startswith("vae-eval: error:")
    assert f"pid {os.getpid()}" in message


def test_train_with_nan_test_numbers_writes_no_test_numbers(tmp_path: Path):
    proc = run_with_nan(
        tmp_path,
        tags.TEST_NLL_IW,
        0,
        "trainer.max_epochs=1",
        "test=true",
        "eval.k=4",
        "eval.limit=20",
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f"{tags.TEST_NLL_IW}=nan" in proc.stderr and "vae-eval ckpt_path=" in proc.stderr
    (run_dir,) = (tmp_path / "logs" / "vae_digits").iterdir()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    metrics = read_metrics(run_dir)
    assert metrics["global_step"] == 23  # the fit's own record is kept
    assert not [k for k in metrics if k.startswith("test/")]
    found = load_events(run_dir).Tags()
    assert not [t for t in found["scalars"] + found["histograms"] if t.startswith("test/")]
    assert not (run_dir / ".writer.lock").exists()
