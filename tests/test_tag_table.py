"""Every tag that the runs write is a row of the README's tag table, so that a user who sees a tag
in TensorBoard finds what it means. The tags are read back from the event files of real runs:
a Gaussian VAE and its variants, a VQ-VAE and its prior (vae-train), and vae-eval with the
sample scores on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.cli import QUICK, last_line, load_events, run_cli

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = ["trainer.max_epochs=1", "trainer.limit_train_batches=5", "trainer.limit_val_batches=1"]
# A few examples and samples, a classifier of a few steps: every test/* tag, in seconds.
TINY_EVAL = [
    "eval.k=2",
    "eval.limit=16",
    "eval.num_samples=32",
    "eval.classifier.steps=5",
    "eval.classifier.hidden_dim=16",
]
KINDS = ("scalars", "images", "histograms", "tensors")
# The HParams tab's own records, documented with the tab ("The HParams tab lists ...").
HPARAMS_PREFIX = "_hparams_/"
EVALUATED = ("vae", "vqvae_prior")


def readme_table_tags() -> set[str]:
    """The tags named, in backticks, in the rows of the README's table headed `| tag | ... |`.
    A pattern such as `test/*` names no tag: a user looks a tag up by its name."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| tag |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return set(re.findall(r"`([a-z_]+/[a-z_0-9]+)`", "\n".join(rows)))


def written_tags(run_dir: Path) -> set[str]:
    """Every scalar, image, histogram and tensor tag in the run's event files."""
    found = load_events(run_dir).Tags()
    return {t for kind in KINDS for t in found.get(kind, []) if not t.startswith(HPARAMS_PREFIX)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """(name -> run directory) of three tiny runs; the Gaussian VAE and the prior evaluated by
    vae-eval."""
    workdir = tmp_path_factory.mktemp("tags")

    def train(*overrides: str) -> Path:
        proc = run_cli("vae-train", *overrides, *TINY, *QUICK, cwd=workdir)
        return workdir / last_line(proc.stdout)

    # The Gaussian VAE and its variants in one process (a sweep), one job folder each: every
    # vae-train process pays ~7 s of imports however tiny its run.
    models = ("vae", "iwae", "beta_tcvae", "vampprior", "ladder_vae")
    run_cli(
        "vae-train",
        "-m",
        f"model={','.join(models)}",
        "name=variants",
        "seed=1",
        *TINY,
        *QUICK,
        cwd=workdir,
    )
    found = {}
    for model in models:
        (job,) = (workdir / "logs" / "variants").glob(f"multirun_*/*_model-{model}*")
        found[model] = job
    found["vqvae"] = train("model=vqvae", "model.num_codes=16", "seed=1")
    found["vqvae_prior"] = train(
        "model=vqvae_prior",
        f"model.vqvae_ckpt={found['vqvae'] / 'checkpoints' / 'last.ckpt'}",
        "model.dim=16",
        "model.depth=1",
        "model.heads=2",
        "model.num_images=8",
    )
    for name in EVALUATED:  # the prior's evaluation also gives the VQ-VAE's test/* tags
        run_cli("vae-eval", f"ckpt_path={found[name]}", *TINY_EVAL, cwd=workdir)
    return found


def test_the_table_is_read():
    assert {"train/loss", "val/elbo", "val/samples", "test/nll_iw"} <= readme_table_tags()


@pytest.mark.parametrize(
    "name", ["vae", "iwae", "beta_tcvae", "vampprior", "ladder_vae", "vqvae", "vqvae_prior"]
)
def test_every_written_tag_is_in_the_readme_table(runs: dict[str, Path], name: str):
    written = written_tags(runs[name])
    if name in EVALUATED:
        assert any(t.startswith("test/") for t in written), "vae-eval wrote no test/* tag"
    missing = sorted(written - readme_table_tags())
    assert not missing, f"{name} writes tags the README's tag table does not name: {missing}"
