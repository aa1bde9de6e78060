"""End to end through the real `vae-train` entry point (subprocesses, temporary log dirs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tensorboard.plugins.hparams import plugin_data_pb2

from tests.cli import QUICK, last_line, load_events, run_cli, scalar_series
from vae.models import GaussianVAE
from vae.training import tags

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """One real 3-epoch run of the default experiment (digits, Gaussian VAE)."""
    workdir = tmp_path_factory.mktemp("e2e")
    proc = run_cli(
        "vae-train",
        "trainer.max_epochs=3",
        "paths.log_dir=logs",
        "seed=7",
        *QUICK,
        cwd=workdir,
    )
    run_dir = workdir / last_line(proc.stdout)
    assert run_dir.is_dir(), proc.stdout
    assert "tensorboard --logdir logs" in proc.stdout
    return run_dir


def test_run_directory_holds_contract_files(digits_run: Path):
    assert (digits_run / "metrics.json").is_file()
    assert (digits_run / ".hydra" / "config.yaml").is_file()
    assert (digits_run / "checkpoints" / "last.ckpt").is_file()
    best = [p for p in (digits_run / "checkpoints").glob("best-*.ckpt")]
    assert len(best) == 1
    assert list(digits_run.glob("events.out.tfevents.*")), "event files must sit in the run dir"
    # The run directory lives under logs/<name>/ so that `tensorboard --logdir logs` finds it.
    assert digits_run.parent.name == "vae_digits"


def test_last_checkpoint_is_the_final_model_and_loads_safely(digits_run: Path):
    metrics = json.loads((digits_run / "metrics.json").read_text())
    last = digits_run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)  # no pickled objects beyond plain data
    assert checkpoint["global_step"] == metrics["global_step"] == 3 * 23
    model = GaussianVAE.load_from_checkpoint(last)
    assert model.latent_dim == 8


def test_every_contract_tag_reads_back(digits_run: Path):
    events = load_events(digits_run)
    found = events.Tags()
    for tag in tags.VAE_SCALARS:
        assert tag in found["scalars"], f"missing scalar {tag}; have {found['scalars']}"
    for tag in tags.VAE_HISTOGRAMS:
        assert tag in found["histograms"], f"missing histogram {tag}"
    for tag in tags.IMAGES:
        assert tag in found["images"], f"missing image {tag}"
    image = events.Images(tags.VAL_SAMPLES)[-1]
    assert image.width > 8 and image.height > 8


def test_hparams_hold_the_config(digits_run: Path):
    records = load_events(digits_run).PluginTagToContent("hparams")
    data = {k: plugin_data_pb2.HParamsPluginData.FromString(v) for k, v in records.items()}
    session = data["_hparams_/session_start_info"].session_start_info
    assert session.hparams["model.beta"].number_value == 1.0
    assert session.hparams["model.latent_dim"].number_value == 8
    assert session.hparams["seed"].number_value == 7
    # No experiment record: TensorBoard then takes the metrics from every run's scalars
    # (tests/test_hparams_tab.py reads the tab as TensorBoard builds it).
    assert "_hparams_/experiment" not in data


def test_kl_positive_and_elbo_improves(digits_run: Path):
    events = load_events(digits_run)
    kl = scalar_series(events, tags.VAL_KL)
    assert all(math.isfinite(v) and v > 0 for _, v in kl)
    elbo = [v for _, v in scalar_series(events, tags.VAL_ELBO)]
    assert len(elbo) == 3
    # The decoder starts at the training mean image (model.init_output_bias), so the first
    # epoch already ends near -27 nats; the ELBO must still improve from there.
    assert elbo[-1] > elbo[0], elbo
    # train/beta is logged although beta is constant.
    assert {v for _, v in scalar_series(events, tags.TRAIN_BETA)} == {1.0}
    # The histogram holds one value per latent dimension (8) and they sum to val/kl.
    histogram = events.Histograms(tags.VAL_KL_PER_DIM)[-1].histogram_value
    assert histogram.num == 8
    assert histogram.sum == pytest.approx(kl[-1][1], rel=1e-4)


def test_metrics_json_matches_tensorboard(digits_run: Path):
    metrics = json.loads((digits_run / "metrics.json").read_text())
    events = load_events(digits_run)
    for tag in tags.VAE_VAL_SCALARS:
        assert metrics[tag] == pytest.approx(scalar_series(events, tag)[-1][1], rel=1e-6)
    assert metrics[tags.VAL_ELBO] == pytest.approx(
        -(metrics[tags.VAL_RECON] + metrics[tags.VAL_KL]), rel=1e-5
    )
    # bits/dim = -ELBO / (64 pixels * ln 2)
    assert metrics[tags.VAL_BITS_PER_DIM] == pytest.approx(
        -metrics[tags.VAL_ELBO] / (64 * math.log(2)), rel=1e-5
    )
    assert metrics[tags.TRAIN_SAMPLES_PER_S] > 0
    assert 0 <= metrics[tags.VAL_ACTIVE_UNITS] <= 8
    # Where the KL goes: the three terms of the whole split add up to val/kl; I(x; z) <= log N.
    parts = [metrics[tag] for tag in (tags.VAL_MUTUAL_INFO, tags.VAL_TOTAL_CORRELATION)]
    parts.append(metrics[tags.VAL_DIMWISE_KL])
    assert sum(parts) == pytest.approx(metrics[tags.VAL_KL], rel=1e-4)
    num_val = 180  # digits: data.val_size
    assert 0 <= metrics[tags.VAL_MUTUAL_INFO] <= math.log(num_val) + 1e-6


def test_same_seed_same_metrics(tmp_path: Path):
    args = ["trainer.max_epochs=1", "trainer.limit_train_batches=5", "seed=3", *QUICK]
    runs = [
        tmp_path / last_line(run_cli("vae-train", *args, cwd=tmp_path).stdout) for _ in range(2)
    ]
    assert runs[0] != runs[1], "two runs must never share a directory"
    first, second = (json.loads((r / "metrics.json").read_text()) for r in runs)
    for metrics in (first, second):
        metrics.pop(tags.TRAIN_SAMPLES_PER_S)
    assert first == second


def test_multirun_gives_one_directory_per_job(tmp_path: Path):
    proc = run_cli(
        "vae-train",
        "-m",
        "model.beta=0.5,4",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        *QUICK,
        cwd=tmp_path,
    )
    metrics_files = sorted((tmp_path / "logs").rglob("metrics.json"))
    assert len(metrics_files) == 2, proc.stdout
    names = sorted(p.parent.name for p in metrics_files)
    assert names[0].startswith("0_") and "model.beta-0.5" in names[0], names
    assert names[1].startswith("1_") and "model.beta-4" in names[1], names
    # Both jobs sit under one sweep folder of the run name, next to single runs.
    assert metrics_files[0].parent.parent == metrics_files[1].parent.parent
    betas = sorted(json.loads(p.read_text())[tags.TRAIN_BETA] for p in metrics_files)
    assert betas == [0.5, 4.0]
