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
from tests.test_data_mnist import fake_arrays, write_dataset

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
    elif cfg.data._target_ == "vae.data.FortunesDataModule":
        from tests.test_data_text import write_corpus

        write_corpus(tmp_path / "corpus")
        overrides += [f"data.root={tmp_path / 'corpus'}", "data.min_count=1"]
    elif cfg.data._target_ != "vae.data.DigitsDataModule":
        pytest.skip(f"no offline fixture for {cfg.data._target_}")
    proc = run_cli("vae-train", *overrides, cwd=tmp_path)
    run_dir = tmp_path / last_line(proc.stdout)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 1
    assert run_dir.parent.name == cfg.name
    # One batch is no result: its name and its metrics.json say so.
    assert "debug-fdr" in run_dir.name and metrics["fast_dev_run"] is True


def test_each_arm_of_the_text_vae_collapse_sweep_changes_only_its_keys():
    """The five arms of `vae-train -m experiment=text_vae_collapse` differ from the collapse arm
    (constant beta, no word dropout, no free bits) in their own key only."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        sweep = compose(
            "config", overrides=["experiment=text_vae_collapse"], return_hydra_config=True
        )
        arms = sweep.hydra.sweeper.params["+text_vae_arm"].split(",")
        models = {
            arm: compose(
                "config", overrides=["experiment=text_vae_collapse", f"+text_vae_arm={arm}"]
            ).model
            for arm in arms
        }
    keys = ("kl_schedule", "free_bits", "word_dropout")
    setting = {arm: tuple(model[k] for k in keys) for arm, model in models.items()}
    assert setting == {
        "no_annealing": ("constant", 0.0, 0.0),
        "linear_warmup": ("linear", 0.0, 0.0),
        "cyclical": ("cyclical", 0.0, 0.0),
        "free_bits": ("constant", 0.25, 0.0),
        "word_dropout": ("constant", 0.0, 0.5),
    }
    assert all(model._target_ == "vae.models.TextVAE" for model in models.values())


FASHION_ARMS = sorted(Path(CONFIG_DIR, "fashion_nll_arm").glob("*.yaml"))


def test_the_likelihood_table_has_every_variant():
    sweep = _composed("fashion_nll_table").hydra.sweeper.params["+fashion_nll_arm"]
    assert sweep.split(",") == [
        "vae",
        "vae_no_defaults",
        "iwae",
        "vampprior",
        "ladder_vae",
        "beta_tcvae",
    ]
    assert {p.stem for p in FASHION_ARMS} == set(sweep.split(","))


@pytest.mark.parametrize("arm", FASHION_ARMS, ids=lambda p: p.stem)
def test_each_arm_of_the_likelihood_table_runs_with_fast_dev_run(arm: Path, tmp_path: Path):
    """Each variant's YAML, found by the glob, builds and takes a step in the table's setup
    (the same 512-unit MLP, 16 latent dimensions where it has one layer)."""
    write_dataset(tmp_path / "data" / "FashionMNIST" / "raw", fake_arrays(0), compress=True)
    overrides = [
        "experiment=fashion_nll_table",
        f"+fashion_nll_arm={arm.stem}",
        "debug=fdr",
        "trainer.accelerator=cpu",
        f"data.root={tmp_path / 'data'}",
        "data.val_size=4",
        "data.search_paths=[]",
    ]
    if arm.stem == "vampprior":
        overrides.append("model.num_pseudo_inputs=8")  # the fake split is tiny
    proc = run_cli("vae-train", *overrides, cwd=tmp_path)
    run_dir = tmp_path / last_line(proc.stdout)
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 1
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "- 512" in config


QUANTIZER_ARMS = sorted(Path(CONFIG_DIR, "quantizer_arm").glob("*.yaml"))


def test_the_quantizer_comparison_sweeps_every_arm():
    sweep = _composed("quantizers_fashion").hydra.sweeper.params["+quantizer_arm"]
    assert set(sweep.split(",")) == {p.stem for p in QUANTIZER_ARMS}


@pytest.mark.parametrize("arm", QUANTIZER_ARMS, ids=lambda p: p.stem)
def test_each_quantizer_arm_runs_with_fast_dev_run(arm: Path, tmp_path: Path):
    """VQ with and without restarts and FSQ, each found by the glob, take a step in the
    comparison's setup with 1,000 codes."""
    write_dataset(tmp_path / "data" / "FashionMNIST" / "raw", fake_arrays(0), compress=True)
    overrides = [
        "experiment=quantizers_fashion",
        f"+quantizer_arm={arm.stem}",
        "debug=fdr",
        "trainer.accelerator=cpu",
        f"data.root={tmp_path / 'data'}",
        "data.val_size=4",
        "data.search_paths=[]",
    ]
    proc = run_cli("vae-train", *overrides, cwd=tmp_path)
    run_dir = tmp_path / last_line(proc.stdout)
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 1
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "num_codes: 1000" in config
    assert ("FiniteScalarQuantizer" in config) == (arm.stem == "fsq")
