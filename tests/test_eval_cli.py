"""`vae-eval` on a tiny real checkpoint: test/* tags go back into the same run, metrics.json is
merged, nothing else is written, and broken inputs end with one message and exit code 2."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments.evaluate import EvaluationError, evaluate
from experiments.train import CONFIG_DIR
from tests.cli import last_line, load_events, run_cli, scalar_series
from vae.training import tags

pytestmark = pytest.mark.slow

QUICK_EVAL = [
    "eval.k=16",
    "eval.limit=40",
    "eval.batch_size=16",
    "eval.num_samples=300",
    "eval.classifier.steps=100",
    "eval.device=cpu",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(working dir, run dir) of a real 2-epoch digits run."""
    workdir = tmp_path_factory.mktemp("eval")
    proc = run_cli(
        "vae-train",
        "trainer.max_epochs=2",
        "trainer.accelerator=cpu",
        "callbacks.progress_bar.refresh_rate=0",
        cwd=workdir,
    )
    return workdir, workdir / last_line(proc.stdout)


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.suffix != ".ckpt"
    }


@pytest.fixture(scope="module")
def evaluated(trained):
    workdir, run_dir = trained
    before = json.loads((run_dir / "metrics.json").read_text())
    config_before = (run_dir / ".hydra" / "config.yaml").read_bytes()
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    # Quoted: a run name may hold '=' (Hydra's override grammar needs quotes around it).
    proc = run_cli("vae-eval", f"ckpt_path='{ckpt}'", *QUICK_EVAL, cwd=workdir)
    return workdir, run_dir, before, config_before, proc


def test_eval_prints_the_run_dir_last_and_writes_no_hydra_clutter(evaluated):
    workdir, run_dir, _, config_before, proc = evaluated
    assert Path(last_line(proc.stdout)) == run_dir.resolve()
    # Only the run's logs and the classifier cache: no outputs/, .hydra/ or *.log in the cwd.
    assert sorted(p.name for p in workdir.iterdir()) == [".cache", "logs"]
    assert list((workdir / ".cache" / "sample_classifier").glob("digits-*.pt"))
    assert (run_dir / ".hydra" / "config.yaml").read_bytes() == config_before
    assert "FID" in proc.stdout  # computed, or skipped with its one-line reason


def test_eval_merges_test_metrics_into_metrics_json(evaluated):
    _, run_dir, before, _, _ = evaluated
    after = json.loads((run_dir / "metrics.json").read_text())
    for key, value in before.items():  # nothing that was there is lost
        assert after[key] == value, key
    for key in (*tags.VAE_TEST_SCALARS, *tags.SAMPLE_SCORE_SCALARS, tags.TEST_KL_PER_DIM):
        assert key in after, key
    assert after[tags.TEST_NUM_EXAMPLES] == 40
    assert after[tags.TEST_IMPORTANCE_SAMPLES] == 16
    assert len(after[tags.TEST_KL_PER_DIM]) == 8
    assert math.isclose(after[tags.TEST_KL], sum(after[tags.TEST_KL_PER_DIM]), rel_tol=1e-6)
    assert math.isclose(
        after[tags.TEST_BITS_PER_DIM], after[tags.TEST_NLL_IW] / (64 * math.log(2)), rel_tol=1e-6
    )
    # NLL_iw(16) <= -ELBO up to Monte Carlo noise; both are per-example nats on 8x8 binary digits.
    assert 5.0 < after[tags.TEST_NLL_IW] < -after[tags.TEST_ELBO] + 0.5
    assert 0 <= after[tags.TEST_ACTIVE_UNITS] <= 8
    assert 0.0 <= after[tags.TEST_LABEL_KL] <= math.log(10) + 1e-6
    assert 1.0 <= after[tags.TEST_CLASSIFIER_SCORE] <= 10.0


def test_eval_writes_test_tags_into_the_same_tensorboard_run(evaluated):
    _, run_dir, before, _, _ = evaluated
    after = json.loads((run_dir / "metrics.json").read_text())
    events = load_events(run_dir)
    assert tags.TEST_KL_PER_DIM in events.Tags()["histograms"]
    for tag in (*tags.VAE_TEST_SCALARS, *tags.SAMPLE_SCORE_SCALARS):
        series = scalar_series(events, tag)
        assert len(series) == 1, tag
        step, value = series[0]
        assert step == before["global_step"], tag  # the checkpoint's step
        # float(): metrics.json writes +inf (a dropped class in test/label_kl_reverse) as "inf".
        assert math.isclose(value, float(after[tag]), rel_tol=1e-6, abs_tol=1e-6), tag
    # The training curves are still there, in the same run.
    assert tags.VAL_ELBO in events.Tags()["scalars"]


def test_a_corrupt_checkpoint_ends_with_one_message_and_exit_code_2(trained):
    workdir, run_dir = trained
    corrupt = run_dir / "checkpoints" / "corrupt.ckpt"
    corrupt.write_bytes(b"\x00not a checkpoint")
    before = snapshot(run_dir)
    try:
        proc = run_cli("vae-eval", f"ckpt_path='{corrupt}'", cwd=workdir, check=False)
    finally:
        corrupt.unlink()
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("vae-eval: error:")
    assert "corrupt" in proc.stderr
    assert snapshot(run_dir) == before


def _eval_config(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


def test_broken_inputs_raise_before_anything_is_written(trained, tmp_path):
    _, run_dir = trained
    before = snapshot(run_dir)
    orphan = tmp_path / "elsewhere" / "checkpoints" / "last.ckpt"
    orphan.parent.mkdir(parents=True)
    shutil.copy(run_dir / "checkpoints" / "last.ckpt", orphan)
    cases = [
        (None, [], "ckpt_path is required"),
        (run_dir / "checkpoints" / "missing.ckpt", [], "does not exist"),
        (orphan, [], "no run config"),
        (run_dir / "checkpoints" / "last.ckpt", ["eval.k=0"], "eval.k=0 is invalid"),
        (run_dir / "checkpoints" / "last.ckpt", ["eval.limit=-3"], "eval.limit=-3"),
    ]
    for ckpt, extra, message in cases:
        overrides = [*extra] + ([f"ckpt_path='{ckpt}'"] if ckpt is not None else [])
        with pytest.raises(EvaluationError, match=message):
            evaluate(_eval_config(*overrides))
    assert snapshot(run_dir) == before
