"""The discretised likelihoods in the Gaussian VAE family: decoder outputs, initial bias, the CLIs.

The end-to-end test trains on the digits at their own 17 levels (``data.binarize=none``) and
reads ``test/bits_per_dim`` from ``vae-train test=true`` and ``vae-eval``: bits per pixel of the discrete data, with no
dequantisation offset, so a model that learned anything is below log2(17) = 4.09 (a uniform
pmf over the levels).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.cli import QUICK, QUICK_EVAL, read_metrics, run_cli
from vae.losses import DISCRETIZED_LIKELIHOODS
from vae.models.gaussian_vae import GaussianVAE
from vae.models.iwae import IWAE
from vae.nn import set_output_bias
from vae.training.config import LIKELIHOODS as CONFIG_LIKELIHOODS

NAMES = sorted(DISCRETIZED_LIKELIHOODS)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("name", NAMES)
def test_the_decoder_outputs_the_likelihoods_parameters_and_starts_at_the_mean(name, arch):
    model = GaussianVAE(
        (2, 8, 6),
        arch=arch,
        hidden_dims=[8],
        latent_dim=3,
        likelihood=name,
        data_levels=17,
        num_mixtures=3,
    )
    per_channel = model.likelihood.params_per_channel
    assert per_channel == (9 if name.endswith("mixture") else 2)
    z = torch.randn(4, 3)
    assert model.decode(z).shape == (4, per_channel * 2, 8, 6)
    # init_output_bias: with the last layer's weights at 0, the decoder outputs the bias alone,
    # whose mean image is the data's (per pixel for the MLP, per channel for the conv decoder).
    mean_image = torch.rand(2, 8, 6, generator=torch.Generator().manual_seed(0))
    set_output_bias(model.decoder, model.likelihood.params_for_mean(mean_image))
    last = [m for m in model.decoder.modules() if getattr(m, "weight", None) is not None][-1]
    torch.nn.init.zeros_(last.weight)
    start = model.likelihood.mean(model.decode(z))
    target = mean_image if arch == "mlp" else mean_image.mean((1, 2), keepdim=True)
    assert (start - target).abs().max() < 0.1  # the edge bins clip the mean a little
    x = torch.randint(0, 17, (4, 2, 8, 6)).float() / 16
    nll = model.reconstruction_nll(model.decode(z), x)
    assert nll.shape == (4,) and torch.isfinite(nll).all()
    assert model.reconstruct(x).shape == model.sample(4).shape == x.shape


def test_variants_share_the_decoder_outputs():
    model = IWAE((1, 8, 8), k=3, likelihood="discretized_logistic", data_levels=17)
    x = torch.randint(0, 17, (5, 1, 8, 8)).float() / 16
    loss, scalars = model.compute_terms(x, step=0)
    assert torch.isfinite(loss) and "bits_per_dim" in scalars


def test_a_discretised_likelihood_needs_the_datas_levels():
    with pytest.raises(ValueError, match="needs 'data_levels'"):
        GaussianVAE((1, 8, 8), likelihood="discretized_logistic", data_levels=None)


def test_the_config_schema_accepts_the_three_names():
    assert DISCRETIZED_LIKELIHOODS <= set(CONFIG_LIKELIHOODS)


@pytest.mark.slow
def test_vae_train_and_vae_eval_report_bits_per_dim_of_the_17_level_digits(tmp_path: Path):
    """One sweep over the three likelihoods, each run ending with its test numbers (test=true);
    vae-eval of a run then gives the same numbers; and a run of one depth is neither resumed
    nor evaluated on data of another."""
    run_cli(
        "vae-train",
        "-m",
        f"model.likelihood={','.join(NAMES)}",
        "name=discretized",
        "data.binarize=none",
        "model.num_mixtures=3",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=10",
        "trainer.limit_val_batches=2",
        "test=true",
        "eval.k=2",
        "eval.limit=16",
        *QUICK,
        cwd=tmp_path,
    )
    runs = {
        OmegaConf.load(job / ".hydra" / "config.yaml").model.likelihood: job
        for job in (tmp_path / "logs" / "discretized").glob("multirun_*/*/")
    }
    assert set(runs) == set(NAMES)
    for name, run_dir in runs.items():
        metrics = read_metrics(run_dir)
        assert 0 < metrics["val/bits_per_dim"] < math.log2(17), name
        assert 0 < metrics["test/bits_per_dim"] < math.log2(17), name
        # No offset: bits/dim is the IW-NLL in bits, over the 64 pixels.
        assert metrics["test/bits_per_dim"] == pytest.approx(
            metrics["test/nll_iw"] / (64 * math.log(2)), rel=1e-6
        ), name
    name = "discretized_logistic_mixture"
    run_dir = runs[name]
    at_the_end_of_training = read_metrics(run_dir)["test/bits_per_dim"]
    run_cli("vae-eval", f"ckpt_path='{run_dir}'", *QUICK_EVAL, cwd=tmp_path)
    assert read_metrics(run_dir)["test/bits_per_dim"] == pytest.approx(
        at_the_end_of_training, rel=1e-6
    )
    # A run of one depth is not resumed, nor evaluated, on data of another.
    resumed = run_cli(
        "vae-train",
        "data.binarize=dynamic",
        f"model.likelihood={name}",
        "model.num_mixtures=3",
        f"ckpt_path='{run_dir}/checkpoints/last.ckpt'",
        *QUICK,
        cwd=tmp_path,
        check=False,
    )
    assert resumed.returncode != 0
    assert "data.binarize: checkpoint 'none', config 'dynamic'" in resumed.stderr
    edited = tmp_path / "edited"
    shutil.copytree(run_dir, edited)
    config = edited / ".hydra" / "config.yaml"
    config.write_text(config.read_text().replace("binarize: none", "binarize: dynamic"))
    evaluated = run_cli("vae-eval", f"ckpt_path='{edited}'", *QUICK_EVAL, cwd=tmp_path, check=False)
    assert evaluated.returncode != 0
    assert "trained on pixels of 17 levels, but the run's data config gives 2" in evaluated.stderr
