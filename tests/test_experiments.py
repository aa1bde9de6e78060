"""Every preset in conf/experiment/ is found by a glob and run once with debug=fdr (the
tables of arms as their sweeps).

A broken preset (bad key, wrong group override, a model that does not build) cannot land.
Datasets that need files get tiny IDX files written here, so the test runs offline.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments.train import CONFIG_DIR
from tests.cli import last_line, run_cli
from tests.test_data_mnist import fake_arrays, write_dataset

pytestmark = pytest.mark.slow

EXPERIMENTS = sorted(Path(CONFIG_DIR, "experiment").glob("*.yaml"))
# Run below as the sweeps they are (one process for all arms), not as one job of their base.
SWEPT_TABLES = ("fashion_nll_table", "quantizers_fashion")
IDX_FOLDERS = {
    "vae.data.FashionMNISTDataModule": "FashionMNIST",
    "vae.data.MNISTDataModule": "MNIST",
}


def test_the_glob_finds_the_presets():
    assert {"vae_fashion", "beta_sweep"} <= {p.stem for p in EXPERIMENTS}


def _composed(experiment: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True)


@pytest.mark.parametrize(
    "preset", [p for p in EXPERIMENTS if p.stem not in SWEPT_TABLES], ids=lambda p: p.stem
)
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
QUANTIZER_ARMS = sorted(Path(CONFIG_DIR, "quantizer_arm").glob("*.yaml"))


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


def test_the_quantizer_comparison_sweeps_every_arm():
    sweep = _composed("quantizers_fashion").hydra.sweeper.params["+quantizer_arm"]
    assert set(sweep.split(",")) == {p.stem for p in QUANTIZER_ARMS}


def _sweep_with_fast_dev_run(experiment: str, arm_group: str, tmp_path: Path) -> dict[str, Path]:
    """``vae-train -m experiment=<experiment> debug=fdr`` on a tiny fake Fashion-MNIST: the
    preset's own sweep, one process for all its arms, as a user runs the table. Returns
    (arm -> job folder), the arm read from the job's recorded overrides."""
    write_dataset(tmp_path / "data" / "FashionMNIST" / "raw", fake_arrays(0), compress=True)
    run_cli(
        "vae-train",
        "-m",
        f"experiment={experiment}",
        "debug=fdr",
        "trainer.accelerator=cpu",
        "callbacks.progress_bar.refresh_rate=0",
        f"data.root={tmp_path / 'data'}",
        "data.val_size=4",
        "data.search_paths=[]",
        cwd=tmp_path,
    )
    jobs = {}
    for job in (tmp_path / "logs" / experiment).glob("multirun_*/*/"):
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        (arm,) = re.findall(rf"\+{arm_group}=(\w+)", overrides)
        jobs[arm] = job
    return jobs


def test_each_arm_of_the_likelihood_table_runs_with_fast_dev_run(tmp_path: Path):
    """Each variant's YAML, found by the glob, builds and takes a step in the table's setup
    (the same 512-unit MLP, 16 latent dimensions where it has one layer)."""
    jobs = _sweep_with_fast_dev_run("fashion_nll_table", "fashion_nll_arm", tmp_path)
    assert set(jobs) == {arm.stem for arm in FASHION_ARMS}
    for arm, job in jobs.items():
        assert json.loads((job / "metrics.json").read_text())["global_step"] == 1, arm
        assert "- 512" in (job / ".hydra" / "config.yaml").read_text(), arm


def test_each_quantizer_arm_runs_with_fast_dev_run(tmp_path: Path):
    """VQ with and without restarts and FSQ, each found by the glob, take a step in the
    comparison's setup with 1,000 codes."""
    jobs = _sweep_with_fast_dev_run("quantizers_fashion", "quantizer_arm", tmp_path)
    assert set(jobs) == {arm.stem for arm in QUANTIZER_ARMS}
    for arm, job in jobs.items():
        assert json.loads((job / "metrics.json").read_text())["global_step"] == 1, arm
        config = (job / ".hydra" / "config.yaml").read_text()
        assert "num_codes: 1000" in config, arm
        assert ("FiniteScalarQuantizer" in config) == (arm == "fsq"), arm
