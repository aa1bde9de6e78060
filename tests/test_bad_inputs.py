"""Bad input everywhere gets a clear error, and nothing already written is lost.

One table of bad inputs across config, data, checkpoints and tensors. Each row names the
error it expects (exit code or exception type) and a message fragment. CLI rows also check
that a failed start leaves no run files behind, and that a failed resume leaves the existing
run byte-for-byte as it was.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tests.cli import QUICK, last_line, run_cli
from tests.test_data_mnist import fake_arrays, write_dataset
from vae import losses


@dataclass
class CliCase:
    name: str
    args: list[str]
    fragments: list[str]
    setup: str | None = None  # how to prepare data/checkpoint files, see _prepare
    extra: list[str] = field(default_factory=list)
    quick: list[str] = field(default_factory=lambda: QUICK)  # the test-run overrides to add
    # Refused by Hydra while composing the config (exit 1, Hydra's own few lines naming the key)
    by_hydra: bool = False


CLI_CASES = [
    # config values
    CliCase("latent_dim_zero", ["model.latent_dim=0"], ["model.latent_dim", "positive integer"]),
    CliCase("negative_batch_size", ["data.batch_size=-1"], ["data.batch_size"]),
    CliCase("negative_beta", ["model.beta=-1"], ["model.beta", ">= 0"]),
    CliCase("unknown_arch", ["model.arch=transformer"], ["model.arch", "mlp", "conv"]),
    CliCase("unknown_likelihood", ["model.likelihood=poisson"], ["model.likelihood", "bernoulli"]),
    CliCase("unknown_binarize", ["data.binarize=sometimes"], ["data.binarize", "dynamic"]),
    CliCase(
        "unknown_schedule", ["model.kl_schedule=exponential"], ["model.kl_schedule", "cyclical"]
    ),
    CliCase("empty_hidden_dims", ["model.hidden_dims=[]"], ["model.hidden_dims"]),
    CliCase("zero_lr", ["model.lr=0"], ["model.lr"]),
    CliCase(
        "removed_key",
        ["train_loop.steps_per_call=8"],
        ["train_loop.steps_per_call no longer exists", "one optimizer step per batch"],
    ),
    CliCase(
        "capacity_with_free_bits",
        ["model.kl_schedule=capacity", "model.free_bits=0.5"],
        ["model.free_bits=0.5", "model.kl_schedule=capacity"],
    ),
    CliCase(
        "moved_key_keeps_its_rules",  # the old spelling is an alias of the regulariser's key
        ["model.warmup_steps=0"],
        ["model.regulariser.warmup_steps=0", "positive integer"],
    ),
    CliCase(
        "image_too_small_for_conv",
        ["model.arch=conv", "model.hidden_dims=[8,8,8,8,8]"],
        ["model.hidden_dims", "at most"],
    ),
    CliCase("vqvae_mlp", ["model=vqvae", "model.arch=mlp"], ["model.arch"]),
    CliCase("lr_beyond_float32", ["model.lr=1e39"], ["model.lr=1e+39", "float32"]),
    CliCase("unknown_precision", ["trainer.precision=99"], ["Precision 99", "trainer.precision"]),
    CliCase(
        "gpu_without_gpu",
        ["trainer.accelerator=gpu"],
        ["trainer.accelerator='gpu'", "no CUDA GPU"],
        quick=[q for q in QUICK if not q.startswith("trainer.accelerator")],
    ),
    CliCase("added_unknown_key", ["+model.betaa=4"], ["model.betaa is not a setting of"]),
    CliCase("log_dir_under_a_file", [], ["paths.log_dir=", "is a file"], setup="log_dir_file"),
    CliCase("unknown_group_option", ["model=nosuchmodel"], ["nosuchmodel"], by_hydra=True),
    CliCase("unknown_key", ["model.nosuchkey=1"], ["model.nosuchkey"], by_hydra=True),
    # data
    CliCase(
        "dataset_missing",
        ["data=fashion_mnist"],
        ["not found", "data.root", "apt-get install dataset-fashion-mnist", "data.download=true"],
        setup="empty_root",
    ),
    CliCase(
        "dataset_partial",
        ["data=mnist"],
        ["incomplete", "t10k-labels-idx1-ubyte"],
        setup="partial_root",
    ),
    CliCase("dataset_truncated", ["data=mnist"], ["truncated"], setup="truncated_root"),
    CliCase(
        "val_size_beyond_the_data",
        ["data=mnist", "data.val_size=100000"],
        ["data.val_size=100000 leaves no training images", "(config key data.val_size)"],
        setup="mnist_root",
    ),
    # checkpoints: resuming into an existing run must not touch it
    CliCase("checkpoint_missing", [], ["does not exist"], setup="ckpt_missing"),
    CliCase("checkpoint_truncated", [], ["truncated or corrupted"], setup="ckpt_truncated"),
    CliCase(
        "checkpoint_other_config",
        ["model.latent_dim=4"],
        ["different model config", "model.latent_dim: checkpoint 8, config 4"],
        setup="ckpt_last",
    ),
    CliCase(
        "checkpoint_other_data",
        ["data.split_seed=5", "data.binarize=none"],
        ["trained on other data", "data.split_seed: checkpoint 0, config 5", "data.binarize"],
        setup="ckpt_last",
    ),
    CliCase(
        "checkpoint_other_arch",
        ["model.arch=conv", "model.hidden_dims=[8,16]"],
        ["different model config", "model.arch"],
        setup="ckpt_last",
    ),
    CliCase("not_a_checkpoint", [], ["not a Lightning checkpoint"], setup="ckpt_garbage"),
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A real, tiny finished run to resume from."""
    workdir = tmp_path_factory.mktemp("finished")
    proc = run_cli(
        "vae-train", "trainer.max_epochs=1", "trainer.limit_train_batches=3", *QUICK, cwd=workdir
    )
    return workdir / last_line(proc.stdout)


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _prepare(case: CliCase, tmp_path: Path, finished_run: Path) -> tuple[list[str], Path | None]:
    """Extra CLI args for the case, and the run directory that must stay untouched (if any)."""
    root = tmp_path / "data"
    if case.setup == "empty_root":
        root.mkdir()
        return [f"data.root={root}", "data.search_paths=[]"], None
    if case.setup == "log_dir_file":
        (tmp_path / "a_file").write_text("")
        return [f"paths.log_dir={tmp_path / 'a_file' / 'logs'}"], None
    if case.setup in ("partial_root", "truncated_root", "mnist_root"):
        raw = root / "MNIST" / "raw"
        arrays = fake_arrays(0)
        roles = ("train_images", "train_labels", "test_images")
        write_dataset(
            raw,
            arrays,
            compress=False,
            roles=roles
            if case.setup == "partial_root"
            else ("train_images", "train_labels", "test_images", "test_labels"),
        )
        if case.setup == "truncated_root":
            image_file = raw / "train-images-idx3-ubyte"
            image_file.write_bytes(image_file.read_bytes()[:500])
        return [f"data.root={root}"], None
    if case.setup and case.setup.startswith("ckpt"):
        run = tmp_path / "run"
        shutil.copytree(finished_run, run)
        checkpoints = run / "checkpoints"
        target = checkpoints / "last.ckpt"
        if case.setup == "ckpt_missing":
            target = checkpoints / "nope.ckpt"
        elif case.setup == "ckpt_truncated":
            target = checkpoints / "cut.ckpt"
            target.write_bytes((checkpoints / "last.ckpt").read_bytes()[:3000])
        elif case.setup == "ckpt_garbage":
            target = checkpoints / "garbage.ckpt"
            torch.save([1, 2, 3], target)
        return [f"ckpt_path={target}"], run
    return [], None


@pytest.mark.slow
@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c.name)
def test_bad_cli_input(case: CliCase, tmp_path: Path, finished_run: Path):
    extra, existing_run = _prepare(case, tmp_path, finished_run)
    before = _snapshot(existing_run) if existing_run else None
    proc = run_cli("vae-train", *case.args, *extra, *case.quick, cwd=tmp_path, check=False)
    assert proc.returncode == (1 if case.by_hydra else 2)
    for fragment in case.fragments:
        assert fragment in proc.stderr, f"{fragment!r} not in:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if not case.by_hydra:
        lines = [line for line in proc.stderr.splitlines() if line.startswith("vae-train: error")]
        assert len(lines) == 1, f"one error line expected:\n{proc.stderr[-3000:]}"
    assert not (tmp_path / "logs").exists(), "a failed start must leave no directory behind"
    if existing_run is not None:
        assert _snapshot(existing_run) == before, "a failed resume must not touch the run"


TENSOR_CASES = [
    (
        "gaussian_kl_shape",
        lambda: losses.gaussian_kl(torch.zeros(4, 3), torch.zeros(4, 2)),
        "shape",
    ),
    (
        "gaussian_kl_nan",
        lambda: losses.gaussian_kl(torch.tensor([float("nan")]), torch.zeros(1)),
        "'mu'",
    ),
    (
        "categorical_negative",
        lambda: losses.categorical_kl(torch.tensor([0.5, 0.5]), torch.tensor([1.1, -0.1])),
        "'q'",
    ),
    (
        "categorical_unnormalised",
        lambda: losses.categorical_kl(torch.tensor([0.5, 0.6]), torch.tensor([0.5, 0.5])),
        "sum to 1",
    ),
    (
        "categorical_nan",
        lambda: losses.categorical_kl(torch.tensor([float("nan"), 1.0]), torch.tensor([0.5, 0.5])),
        "'p'",
    ),
    (
        "bernoulli_target_range",
        lambda: losses.bernoulli_nll(torch.zeros(2, 3), torch.full((2, 3), 2.0)),
        "'target'",
    ),
    ("entropy_negative", lambda: losses.entropy(torch.tensor([1.5, -0.5])), "'p'"),
    (
        "elbo_batch_mismatch",
        lambda: losses.compute_elbo(torch.zeros(3), torch.zeros(4, 2)),
        "batch",
    ),
]


@pytest.mark.parametrize("name, call, fragment", TENSOR_CASES, ids=[c[0] for c in TENSOR_CASES])
def test_bad_tensor_input(name, call, fragment):
    with pytest.raises(ValueError, match=None) as error:
        call()
    assert fragment in str(error.value), str(error.value)


def test_the_table_is_large_enough():
    assert len(CLI_CASES) + len(TENSOR_CASES) >= 15


def test_every_case_is_a_row_of_the_readme_table():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("### Bad input and faults")[1].split("\n## ")[0]
    names = [case.name for case in CLI_CASES] + [case[0] for case in TENSOR_CASES]
    assert [name for name in names if f"`{name}`" not in table] == []
