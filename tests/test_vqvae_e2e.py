"""VQ-VAE then its prior, end to end through `vae-train` on the embedded digits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.cli import QUICK as CLI_QUICK
from tests.cli import last_line, load_events, run_cli, scalar_series
from vae.training import tags

pytestmark = pytest.mark.slow

QUICK = ["debug=limit", *CLI_QUICK]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vqvae_e2e")


@pytest.fixture(scope="module")
def vqvae_run(workdir: Path) -> Path:
    proc = run_cli("vae-train", "model=vqvae", "model.num_codes=32", "seed=3", *QUICK, cwd=workdir)
    return workdir / last_line(proc.stdout)


@pytest.fixture(scope="module")
def prior_run(workdir: Path, vqvae_run: Path) -> Path:
    ckpt = vqvae_run / "checkpoints" / "last.ckpt"
    proc = run_cli(
        "vae-train",
        "model=vqvae_prior",
        f"model.vqvae_ckpt={ckpt}",
        "model.dim=32",
        "model.depth=1",
        "model.num_images=16",
        *QUICK,
        cwd=workdir,
    )
    return workdir / last_line(proc.stdout)


def test_vqvae_writes_every_contract_tag(vqvae_run: Path):
    events = load_events(vqvae_run)
    found = events.Tags()
    for tag in (*tags.VQVAE_TRAIN_SCALARS, *tags.VQVAE_VAL_SCALARS):
        assert tag in found["scalars"], f"missing scalar {tag}; have {found['scalars']}"
    for tag in (tags.VAL_RECONSTRUCTIONS, tags.VAL_CODE_HISTOGRAM):
        assert tag in found["images"], f"missing image {tag}"
    assert tags.VAL_SAMPLES not in found["images"]  # no prior in this stage
    histogram = events.Images(tags.VAL_CODE_HISTOGRAM)[-1]
    assert histogram.width >= 32
    # 8x8 digits through two stride-2 convs: a 2x2 grid, rate 4 log 32 nats.
    rate = [value for _, value in scalar_series(events, tags.TRAIN_KL)]
    assert rate and all(value == pytest.approx(4 * math.log(32), rel=1e-6) for value in rate)
    metrics = json.loads((vqvae_run / "metrics.json").read_text())
    assert 0 < metrics[tags.VAL_CODEBOOK_USAGE] <= 1
    assert 1 <= metrics[tags.VAL_PERPLEXITY] <= 32
    # The epoch's perplexity cannot exceed the number of codes it used.
    assert metrics[tags.VAL_PERPLEXITY] <= metrics[tags.VAL_CODEBOOK_USAGE] * 32 + 1e-6


def test_prior_samples_and_bounds_the_same_reconstruction(vqvae_run: Path, prior_run: Path):
    events = load_events(prior_run)
    found = events.Tags()
    for tag in (*tags.VQVAE_PRIOR_TRAIN_SCALARS, *tags.VQVAE_PRIOR_VAL_SCALARS):
        assert tag in found["scalars"], f"missing scalar {tag}"
    assert tags.VAL_SAMPLES in found["images"]
    metrics = json.loads((prior_run / "metrics.json").read_text())
    vq_metrics = json.loads((vqvae_run / "metrics.json").read_text())
    # The frozen VQ-VAE reconstructs the validation split exactly as at the end of its own run.
    assert metrics[tags.VAL_RECON] == pytest.approx(vq_metrics[tags.VAL_RECON], rel=1e-4)
    assert metrics[tags.VAL_ELBO] == pytest.approx(
        -(metrics[tags.VAL_RECON] + metrics[tags.VAL_KL]), rel=1e-5
    )
    assert metrics[tags.VAL_BITS_PER_DIM] == pytest.approx(
        -metrics[tags.VAL_ELBO] / (64 * math.log(2)), rel=1e-5
    )
    # A learned prior needs no more than a uniform one (4 log 32 nats) after a few steps.
    assert 0 < metrics[tags.VAL_KL] < 4 * math.log(32) + 1.0


def test_the_prior_run_name_leaves_out_the_checkpoint_path(vqvae_run: Path, prior_run: Path):
    # The path is in the run's config (and HParams); in the name it was a four-line label.
    assert prior_run.parent.name == "vqvae_prior_digits"
    assert "vqvae_ckpt" not in prior_run.name and vqvae_run.name not in prior_run.name
    assert "model.dim-32" in prior_run.name  # the other overrides still name it
