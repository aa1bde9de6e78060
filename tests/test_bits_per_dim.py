"""bits/dim is logged only where it is comparable with the literature.

* Bernoulli on binarized pixels: a probability, nll / (pixels ln 2).
* Gaussian / Laplace: a density of the uniformly dequantized pixels (k + u) / L, so
  nll / (pixels ln 2) + log2 L, an upper bound on the discrete pixels' bits/dim.
* Bernoulli on grey levels: not a normalised likelihood, so no number at all.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from experiments.train import CONFIG_DIR
from tests.cli import QUICK, last_line, load_events, read_metrics, run_cli
from vae.data import DigitsDataModule
from vae.losses import bits_per_dim, uniform_dequantize
from vae.models import VQVAE, GaussianVAE

DIGITS_PIXELS = 64
DIGITS_LEVELS = 17


# --- the pure functions -------------------------------------------------------------------
def test_uniform_density_on_8_bit_pixels_is_exactly_8_bits():
    # The uniform density on [0, 1)^D has log p = 0 everywhere: 8 bits per 8-bit pixel.
    assert bits_per_dim(torch.tensor(0.0), 784, dequantization_levels=256) == 8.0
    assert bits_per_dim(0.0, 64, dequantization_levels=17) == pytest.approx(math.log2(17))


def test_bits_per_dim_without_levels_is_a_change_of_units():
    assert bits_per_dim(784 * math.log(2.0), 784) == pytest.approx(1.0)


@pytest.mark.parametrize("levels", [0, 1, 2.5, True, None.__class__])
def test_bad_levels_are_refused_naming_the_argument(levels):
    with pytest.raises(ValueError, match="dequantization_levels"):
        bits_per_dim(1.0, 10, dequantization_levels=levels)


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_dequantized_pixels_stay_in_their_bin_and_fill_it(levels: int):
    k = torch.arange(levels, dtype=torch.float64).repeat(4000)
    y = uniform_dequantize(k / (levels - 1), levels, generator=torch.Generator().manual_seed(0))
    offset = y * levels - k  # u, which must be U[0, 1) in every bin
    assert bool(((offset >= 0) & (offset < 1)).all())
    assert float(offset.mean()) == pytest.approx(0.5, abs=0.01)
    assert float(offset.var()) == pytest.approx(1 / 12, abs=0.005)


# --- the data says how many levels it has ---------------------------------------------------
@pytest.mark.parametrize("binarize, levels", [("none", 17), ("static", 2), ("dynamic", 2)])
def test_digits_know_their_levels_before_reading_any_data(binarize: str, levels: int):
    data = DigitsDataModule(binarize=binarize)
    assert data.num_levels == levels
    data.setup()
    values = torch.unique(data.val_split.images)  # dynamic binarizes training batches later
    assert values.numel() <= levels and bool(
        torch.equal(values * (levels - 1), torch.round(values * (levels - 1)))
    )


# --- the models ----------------------------------------------------------------------------
def _terms(model, x):
    model.eval()
    with torch.no_grad():
        return model.compute_terms(x, step=0)[1]


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    data = DigitsDataModule(binarize="none")
    data.setup()
    return data.val_split.images


@pytest.mark.parametrize("likelihood", ["gaussian", "laplace"])
def test_density_bits_per_dim_carry_the_log_levels_offset(likelihood: str, digits):
    torch.manual_seed(0)
    model = GaussianVAE((1, 8, 8), likelihood=likelihood, sigma=0.05, data_levels=DIGITS_LEVELS)
    terms = _terms(model, digits)
    expected = -float(terms["elbo"]) / (DIGITS_PIXELS * math.log(2)) + math.log2(DIGITS_LEVELS)
    assert float(terms["bits_per_dim"]) == pytest.approx(expected, rel=1e-6)
    assert "bits_per_dim" in model.val_scalar_names()


def test_a_sharp_density_cannot_report_negative_bits(digits):
    """The bug: sigma = 0.01 around a perfect reconstruction is a density ~40 per pixel, so
    -ELBO / (D ln 2) is negative. On dequantized targets, with the offset, it cannot be."""
    torch.manual_seed(0)
    model = GaussianVAE((1, 8, 8), likelihood="gaussian", sigma=0.01, data_levels=DIGITS_LEVELS)
    model.eval()
    bin_centres = (torch.round(digits * 16) + 0.5) / DIGITS_LEVELS  # the best fixed mean
    recon = model.reconstruction_nll(bin_centres, digits)
    density_nats = float(recon.mean())
    bits = model.bits_per_dim(density_nats)
    assert bits > 0
    # Without dequantization the same mean at x itself would have had a huge density:
    undequantized = (
        torch.nn.functional.gaussian_nll_loss(
            digits, digits, torch.full_like(digits, 1e-4), full=True, reduction="sum"
        )
        / digits.shape[0]
    )
    assert float(undequantized) / (DIGITS_PIXELS * math.log(2)) < 0


def test_vqvae_density_bits_per_dim_carry_the_offset():
    torch.manual_seed(0)
    model = VQVAE(
        (1, 28, 28),
        hidden_dims=(8, 8),
        code_dim=4,
        num_codes=8,
        num_res_blocks=0,
        likelihood="gaussian",
        data_levels=256,
    )
    x = torch.randint(0, 256, (4, 1, 28, 28)).float() / 255
    terms = _terms(model, x)
    expected = -float(terms["elbo"]) / (784 * math.log(2)) + 8.0
    assert float(terms["bits_per_dim"]) == pytest.approx(expected, rel=1e-6)


def test_bernoulli_on_binary_pixels_has_no_offset(digits):
    model = GaussianVAE((1, 8, 8), likelihood="bernoulli", data_levels=2)
    binary = (digits > 0.5).float()
    terms = _terms(model, binary)
    assert float(terms["bits_per_dim"]) == pytest.approx(
        -float(terms["elbo"]) / (DIGITS_PIXELS * math.log(2)), rel=1e-6
    )


@pytest.mark.parametrize("data_levels", [DIGITS_LEVELS, None])
def test_no_bits_per_dim_where_none_is_valid(data_levels, digits):
    """Bernoulli on grey levels is a cross-entropy, not a likelihood; unknown depth: no offset."""
    model = GaussianVAE((1, 8, 8), likelihood="bernoulli", data_levels=data_levels)
    assert "bits_per_dim" not in _terms(model, digits)
    assert "bits_per_dim" not in model.val_scalar_names()
    assert model.bits_per_dim(10.0) is None


def test_model_sigma_is_a_config_key():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["model.sigma=0.5", "model.likelihood=gaussian"])
    assert cfg.model.sigma == 0.5


# --- end to end ---------------------------------------------------------------------------
@pytest.mark.slow
def test_learned_sigma_gaussian_run_reports_honest_bits(tmp_path: Path):
    """With a learned scale, a density on undequantized pixels grows without bound (the run
    in the issue reached val/elbo = +0.39, bits/dim = -0.009). Here every bits/dim written,
    val and test, is the discrete bound; a Bernoulli run on grey levels writes none."""
    proc = run_cli(
        "vae-train",
        "model.likelihood=gaussian",
        "model.learn_sigma=true",
        "data.binarize=none",
        "trainer.max_epochs=15",
        "test=true",
        "eval.k=50",
        *QUICK,
        cwd=tmp_path,
    )
    metrics = read_metrics(tmp_path / last_line(proc.stdout))
    offset = math.log2(DIGITS_LEVELS)
    assert metrics["val/bits_per_dim"] == pytest.approx(
        -metrics["val/elbo"] / (DIGITS_PIXELS * math.log(2)) + offset, rel=1e-5
    )
    assert metrics["test/bits_per_dim"] == pytest.approx(
        metrics["test/nll_iw"] / (DIGITS_PIXELS * math.log(2)) + offset, rel=1e-9
    )
    assert 0 < metrics["test/bits_per_dim"] <= metrics["val/bits_per_dim"] + 1.0

    proc = run_cli("vae-train", "data.binarize=none", "trainer.max_epochs=1", *QUICK, cwd=tmp_path)
    run_dir = tmp_path / last_line(proc.stdout)
    assert "val/bits_per_dim" not in read_metrics(run_dir)
    assert "val/bits_per_dim" not in load_events(run_dir).Tags()["scalars"]
