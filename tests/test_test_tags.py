"""Each test/* tag has one definition: `vae-train test=true` and `vae-eval` both compute them
with ``vae.eval.suite.evaluate_split``, so on the same weights and settings they agree exactly,
and neither writes a test/* tag the other defines differently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli import QUICK, last_line, load_events, read_metrics, run_cli
from vae.training import tags
from vae.training.runs import METRICS_FILE

pytestmark = pytest.mark.slow

EVAL = ["eval.k=32", "eval.limit=60", "eval.batch_size=16", "eval.seed=3"]


@pytest.mark.parametrize(
    "model_args",
    [
        [],
        ["model.likelihood=gaussian", "data.binarize=none"],
    ],
    ids=["bernoulli", "gaussian"],
)
def test_train_with_test_and_eval_write_the_same_test_numbers(tmp_path: Path, model_args):
    proc = run_cli(
        "vae-train", "trainer.max_epochs=2", "test=true", *EVAL, *model_args, *QUICK, cwd=tmp_path
    )
    run_dir = tmp_path / last_line(proc.stdout)
    from_train = {k: v for k, v in read_metrics(run_dir).items() if k.startswith("test/")}
    # The importance-weighted bound, not a one-sample ELBO; no test/loss (a training objective).
    assert from_train[tags.TEST_IMPORTANCE_SAMPLES] == 32
    assert from_train[tags.TEST_NUM_EXAMPLES] == 60
    assert "test/loss" not in from_train
    assert from_train[tags.TEST_NLL_IW] <= -from_train[tags.TEST_ELBO] + 1.0
    events = load_events(run_dir)
    assert tags.TEST_NLL_IW in events.Tags()["scalars"]
    assert tags.TEST_KL_PER_DIM in events.Tags()["histograms"]

    # vae-eval must write every one of them again by itself.
    kept = {k: v for k, v in read_metrics(run_dir).items() if not k.startswith("test/")}
    (run_dir / METRICS_FILE).write_text(json.dumps(kept))
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    run_cli("vae-eval", f"ckpt_path='{ckpt}'", *EVAL, "eval.sample_scores=false", cwd=tmp_path)
    from_eval = {k: v for k, v in read_metrics(run_dir).items() if k.startswith("test/")}
    assert from_eval == from_train
