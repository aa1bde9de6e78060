"""Every preset in conf/experiment/ is found by a glob and run once with debug=fdr.

A broken preset (bad key, wrong group override, a model that does not build) cannot land.
Datasets that need files get tiny IDX files written here, so the test runs offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments.train import CONFIG_DIR
from tests.cli import last_line, run_cli
from tests.test_data_mnist import NUM_TRAIN, fake_arrays, write_dataset
from vae.training.checkpoints import read_checkpoint

pytestmark = pytest.mark.slow

EXPERIMENTS = sorted(Path(CONFIG_DIR, "experiment").glob("*.yaml"))
IDX_FOLDERS = {
    "vae.data.FashionMNISTDataModule": "FashionMNIST",
    "vae.data.MNISTDataModule": "MNIST",
}


def test_the_glob_finds_the_presets():
    assert {"vae_fashion", "beta_sweep"} <= {p.stem for p in EXPERIMENTS}


def _composed(experiment: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True)


@pytest.mark.parametrize("preset", EXPERIMENTS, ids=lambda p: p.stem)
def test_preset_runs_with_fast_dev_run(preset: Path, tmp_path: Path):
    cfg = _composed(preset.stem)
    overrides = [f"experiment={preset.stem}", "debug=fdr", "trainer.accelerator=cpu"]
    folder = IDX_FOLDERS.get(cfg.data._target_)
    if folder is not None:
        write_dataset(tmp_path / "data" / folder / "raw", fake_arrays(0), compress=True)
        overrides += [f"data.root={tmp_path / 'data'}", "data.val_size=4", "data.search_paths=[]"]
    elif cfg.data._target_ != "vae.data.DigitsDataModule":
        pytest.skip(f"no offline fixture for {cfg.data._target_}")
    proc = run_cli("vae-train", *overrides, cwd=tmp_path)
    run_dir = tmp_path / last_line(proc.stdout)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 1
    assert run_dir.parent.name == cfg.name


PACKED = [
    p
    for p in EXPERIMENTS
    if (_composed(p.stem).get("train_loop") or {}).get("steps_per_call", 1) > 1
]


@pytest.mark.parametrize("preset", PACKED, ids=lambda p: p.stem)
def test_packed_preset_trains_in_packs(preset: Path, tmp_path: Path):
    """debug=fdr makes every preset fall back to one step per batch; this runs the presets that
    pack batches (train_loop.steps_per_call > 1) for one short epoch as they are."""
    cfg = _composed(preset.stem)
    folder = IDX_FOLDERS[cfg.data._target_]
    write_dataset(tmp_path / "data" / folder / "raw", fake_arrays(0), compress=True)
    overrides = [f"experiment={preset.stem}", "trainer.accelerator=cpu", "trainer.max_epochs=1"]
    overrides += [f"data.root={tmp_path / 'data'}", "data.val_size=4", "data.search_paths=[]"]
    overrides += ["data.batch_size=1", "callbacks.progress_bar.refresh_rate=0"]  # 2 packs
    run_dir = tmp_path / last_line(run_cli("vae-train", *overrides, cwd=tmp_path).stdout)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == NUM_TRAIN - 4  # every batch one step
    assert "-> 1" not in (run_dir / "train.log").read_text()  # no fallback
    checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert checkpoint["steps_per_call"] == cfg.train_loop.steps_per_call > 1
