"""Two-level ladder VAE: the precision-weighted posterior, the per-layer KLs and free bits, the
importance weights against the ELBO, and a digits run through vae-train and vae-eval."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.cli import QUICK, QUICK_EVAL, last_line, load_events, run_cli, scalar_series
from vae.eval.nll import importance_weighted_bounds
from vae.models.ladder_vae import LadderVAE, precision_weighted
from vae.training import tags

SHAPE = (1, 8, 8)
LAYER_TAGS = ("val/kl_layer1", "val/kl_layer2")
LAYER_HISTOGRAMS = ("val/kl_per_dim_layer1", "val/kl_per_dim_layer2")


def small(**kwargs) -> LadderVAE:
    torch.manual_seed(0)
    defaults = {"hidden_dims": [32], "latent_dims": [4, 2], "top_hidden_dims": [16]}
    return LadderVAE(image_shape=SHAPE, **{**defaults, **kwargs})


def binary_images(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.rand(n, *SHAPE, generator=generator), generator=generator)


def test_precision_weighting_is_the_product_of_the_two_gaussians():
    generator = torch.Generator().manual_seed(0)
    mu_a, logvar_a, mu_b, logvar_b = torch.randn(4, 5, 3, generator=generator, dtype=torch.float64)
    mu, logvar = precision_weighted(mu_a, logvar_a, mu_b, logvar_b)
    precision_a, precision_b = logvar_a.neg().exp(), logvar_b.neg().exp()
    variance = 1 / (precision_a + precision_b)
    torch.testing.assert_close(logvar, variance.log())
    torch.testing.assert_close(mu, variance * (mu_a * precision_a + mu_b * precision_b))


def test_the_layer_kls_add_up_to_the_logged_kl_exactly():
    model = small()
    loss, terms = model.compute_terms(binary_images(16), step=0)
    assert float(terms["kl_layer1"].detach()) > 0 and float(terms["kl_layer2"].detach()) > 0
    assert torch.equal(terms["kl"], terms["kl_layer1"] + terms["kl_layer2"])
    assert torch.equal(terms["elbo"], -(terms["recon"] + terms["kl"]))
    torch.testing.assert_close(loss, terms["recon"] + terms["kl"])  # beta = 1, no free bits


def test_free_bits_apply_per_dimension_of_each_layer():
    free_bits = 50.0  # far above every dimension's KL: each of the 4 + 2 contributes lambda
    model = small(free_bits=free_bits)
    loss, terms = model.compute_terms(binary_images(16), step=0)
    torch.testing.assert_close(loss, terms["recon"] + free_bits * (4 + 2))


def test_log_weights_average_to_the_elbo():
    model = small().eval()
    x, repeats = binary_images(4), 4000
    with torch.no_grad():
        torch.manual_seed(1)
        recon, kl1, kl2 = model.layer_terms(x.repeat(repeats, 1, 1, 1))
        elbo = -(recon + kl1.sum(1) + kl2.sum(1)).view(repeats, 4).T  # (4, repeats)
        log_w, _ = model.importance_sample(x, repeats, torch.Generator().manual_seed(2))
    # Two unbiased estimates of each example's ELBO: E_q[log w] = ELBO.
    difference = elbo.mean(1) - log_w.mean(1)
    standard_error = torch.sqrt((elbo.var(1) + log_w.var(1)) / repeats)
    assert bool((difference.abs() < 4 * standard_error).all()), (difference, standard_error)
    assert float(standard_error.max()) < 0.1  # sharp enough to see a missing term


def test_the_importance_weighted_bound_tightens_with_k():
    model = small().eval()
    x = binary_images(512, seed=3)
    nll = {}
    for k in (1, 10, 100):
        bounds = importance_weighted_bounds(model, x, k, generator=torch.Generator().manual_seed(k))
        assert bounds.kl_per_dim is None
        nll[k] = bounds.nll_iw
        if k == 1:  # L_1 is one draw of the ELBO: its KL is the Monte Carlo log q - log p
            torch.testing.assert_close(bounds.nll_iw, -bounds.elbo)
    for small_k, large_k in ((1, 10), (10, 100)):
        gain = nll[small_k] - nll[large_k]  # per example, so that only the draws differ
        standard_error = float(gain.std()) / math.sqrt(gain.numel())
        assert float(gain.mean()) > 3 * standard_error, (small_k, large_k, gain.mean())


def test_samples_and_reconstructions_are_images_in_the_data_range():
    model = small().eval()
    samples, again = model.sample(10), model.sample(10)
    assert samples.shape == (10, *SHAPE) and torch.equal(samples, again)
    assert model.sample(100).shape == (100, *SHAPE)
    recon = model.reconstruct(binary_images(3))
    assert recon.shape == (3, *SHAPE) and 0 <= float(recon.min()) <= float(recon.max()) <= 1
    mu, logvar = model.encode(binary_images(3))
    assert mu.shape == logvar.shape == (3, 4 + 2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"latent_dims": [4]}, "model.latent_dims"),
        ({"latent_dims": [4, 0]}, "model.latent_dims"),
        ({"latent_dim": 4}, "model.latent_dims"),
        ({"top_hidden_dims": [16, -1]}, "model.top_hidden_dims"),
    ],
)
def test_bad_settings_name_their_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small(**kwargs)


@pytest.mark.slow
def test_a_digits_run_logs_both_layers_and_evaluates(tmp_path):
    proc = run_cli("vae-train", "model=ladder_vae", "trainer.max_epochs=1", *QUICK, cwd=tmp_path)
    run_dir = Path(last_line(proc.stdout))
    events = load_events(run_dir)
    for tag in LAYER_HISTOGRAMS:
        assert tag in events.Tags()["histograms"], tag
    (_, layer1), (_, layer2), (_, kl) = (
        scalar_series(events, tag)[-1] for tag in (*LAYER_TAGS, tags.VAL_KL)
    )
    assert math.isclose(layer1 + layer2, kl, rel_tol=1e-5)
    assert tags.VAL_MUTUAL_INFO not in events.Tags()["scalars"]  # no decomposition here

    run_cli(
        "vae-eval",
        f"ckpt_path='{run_dir}'",
        *QUICK_EVAL,
        cwd=tmp_path,
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics[tags.TEST_NUM_EXAMPLES] == 16 and metrics[tags.TEST_IMPORTANCE_SAMPLES] == 2
    assert tags.TEST_KL_PER_DIM not in metrics and tags.TEST_MUTUAL_INFO not in metrics
    assert math.isclose(
        metrics[tags.TEST_ELBO], -(metrics[tags.TEST_RECON] + metrics[tags.TEST_KL]), rel_tol=1e-9
    )
    assert 0 <= metrics[tags.TEST_ACTIVE_UNITS] <= 16 + 8  # the config's latent_dims
    assert 5.0 < metrics[tags.TEST_NLL_IW] < -metrics[tags.TEST_ELBO] + 1.0
