"""What the console scripts print: no library noise in a real run, and a `vae-eval --help` that
lists vae-eval's own keys only."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli import QUICK, last_line, read_metrics, run_cli
from vae.training import tags

# Lightning's messages that a kl-vae user cannot act on (vae.training.library_noise), and the
# one Lightning printed at every checkpoint save until LastCheckpoint passed weights_only.
NOISE = ("litlogger", "LeafSpec", "weights_only")
EPOCHS = 5


@pytest.fixture(scope="module")
def vqvae_run(tmp_path_factory) -> tuple[Path, str]:
    """(run directory, stderr) of the default digits VQ-VAE, for a few epochs."""
    workdir = tmp_path_factory.mktemp("console")
    proc = run_cli("vae-train", "model=vqvae", f"trainer.max_epochs={EPOCHS}", *QUICK, cwd=workdir)
    return workdir / last_line(proc.stdout), proc.stderr


def test_a_run_prints_and_logs_no_library_noise(vqvae_run):
    run_dir, stderr = vqvae_run
    log = (run_dir / "train.log").read_text()
    for text in (stderr, log):
        assert not [line for line in text.splitlines() if any(n in line for n in NOISE)]
        # Lightning's warnings about our own logging (e.g. an integer passed to self.log)
        assert "self.log(" not in text
    assert "`Trainer.fit` stopped: `max_epochs=5` reached." in log  # the rest still shows
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()  # saved at every epoch's end


def test_the_default_digits_codebook_is_used_within_a_few_epochs(vqvae_run):
    """The digits give 2x2 codes per image: 720 code vectors in a validation epoch, 5,748 in a
    training epoch. The default codebook must be small enough for most codes to be used."""
    run_dir, _ = vqvae_run
    metrics = read_metrics(run_dir)
    assert metrics["epoch"] == EPOCHS
    assert metrics[tags.VAL_CODEBOOK_USAGE] >= 0.75


def test_vae_eval_help_lists_its_own_keys_only(tmp_path: Path):
    text = run_cli("vae-eval", "--help", cwd=tmp_path).stdout
    assert "ckpt_path" in text and "eval:" in text and "  k: 5000" in text
    for group in ("model", "trainer", "callbacks", "data", "experiment", "debug"):
        assert not any(line.startswith(f"{group}:") for line in text.splitlines()), group


def test_a_config_warning_is_printed_once(tmp_path: Path):
    """vae-train checks the config before torch loads and train() checks it for other callers:
    the CLI must do it once, or each warning of the check shows twice."""
    proc = run_cli("vae-train", "data.binarize=none", "debug=fdr", *QUICK, cwd=tmp_path)
    assert proc.stderr.count("the Bernoulli NLL is not a likelihood of grey-level pixels") == 1
