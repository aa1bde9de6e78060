"""A new model is one file: a toy variant defined outside the library (tests/variants) runs
through vae-train, vae-eval and vae-compare with no change to library code."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli import QUICK, REPO, last_line, load_events, read_metrics, run_cli, scalar_series
from tests.variants.sparse_vae import SparseVAE
from vae.models import GaussianVAE

pytestmark = pytest.mark.slow

VARIANTS = REPO / "tests" / "variants"
ON_PATH = {"PYTHONPATH": str(REPO)}  # so that Hydra can import tests.variants.sparse_vae


def test_the_variant_is_one_short_file():
    source = (VARIANTS / "sparse_vae.py").read_text().splitlines()
    assert len(source) <= 80
    assert issubclass(SparseVAE, GaussianVAE)


def test_a_variant_trains_evaluates_and_compares_without_library_changes(tmp_path: Path):
    common = [f"--config-dir={VARIANTS / 'conf'}", "trainer.max_epochs=2", "seed=0", *QUICK]
    runs = []
    for weight in (0.0, 2.0):
        proc = run_cli(
            "vae-train",
            *common,
            "model=sparse_vae",
            f"model.l1_weight={weight}",
            cwd=tmp_path,
            env=ON_PATH,
        )
        runs.append(tmp_path / last_line(proc.stdout))
    assert runs[0].parent.name == "sparse_vae_digits"
    events = load_events(runs[1])
    l1 = scalar_series(events, "train/l1")
    assert l1 and all(value >= 0 for _, value in l1)
    # The penalty enters the loss and never the ELBO: loss = recon + beta * KL + l1.
    metrics = read_metrics(runs[1])
    assert metrics["val/loss"] == pytest.approx(
        metrics["val/recon"] + metrics["val/kl"] + metrics["val/l1"], rel=1e-5
    )
    assert metrics["val/elbo"] == pytest.approx(-(metrics["val/recon"] + metrics["val/kl"]))
    assert read_metrics(runs[0])["val/l1"] == 0.0

    ckpt = runs[1] / "checkpoints" / "last.ckpt"
    run_cli(
        "vae-eval",
        f"ckpt_path='{ckpt}'",
        "eval.k=8",
        "eval.limit=32",
        "eval.sample_scores=false",
        "eval.device=cpu",
        cwd=tmp_path,
        env=ON_PATH,
    )
    assert read_metrics(runs[1])["test/nll_iw"] > 0
    # load_from_checkpoint rebuilds the variant, its parts and its own key from the file alone.
    model = SparseVAE.load_from_checkpoint(ckpt, map_location="cpu")
    assert model.l1_weight == 2.0

    run_cli("vae-compare", "logs", "--out", "report", cwd=tmp_path)
    table = (tmp_path / "report" / "runs.md").read_text()
    assert "l1_weight" in table
