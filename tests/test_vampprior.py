"""VampPrior VAE: the mixture prior's density, the Monte Carlo KL against the closed form where
one exists, vae-eval's importance-sampling path against the plain Gaussian one, and a digits run
through vae-train and vae-eval."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.cli import QUICK, QUICK_EVAL, last_line, load_events, run_cli
from vae.eval.nll import importance_weighted_bounds
from vae.losses import gaussian_kl
from vae.models.vampprior import VampPriorVAE, log_mixture_density
from vae.training import tags

SHAPE = (1, 8, 8)


class StandardNormalPrior(VampPriorVAE):
    """One component, forced to N(0, I): the VampPrior machinery with the plain VAE's prior."""

    def prior_components(self):
        zeros = torch.zeros(1, self.latent_dim)
        return zeros, zeros


class GaussianPathOnly:
    """The same model through the protocol of a plain Gaussian VAE (no importance_sample)."""

    def __init__(self, model):
        self.encode, self.decode = model.encode, model.decode
        self.reconstruction_nll = model.reconstruction_nll


def small(cls=VampPriorVAE, **kwargs):
    torch.manual_seed(0)
    defaults = {"hidden_dims": [32], "latent_dim": 4, "num_pseudo_inputs": 5}
    return cls(image_shape=SHAPE, **{**defaults, **kwargs})


def test_monte_carlo_kl_matches_the_closed_form_within_its_standard_error():
    model = small(StandardNormalPrior)
    generator = torch.Generator().manual_seed(0)
    mu = 1.5 * torch.randn(6, 4, generator=generator)
    logvar = torch.randn(6, 4, generator=generator)
    z, log_q = model.draw_latents(mu, logvar, 4000, generator)
    estimate = model.monte_carlo_kl(z, log_q)
    closed_form = gaussian_kl(mu, logvar).sum(-1)
    assert bool((estimate.standard_error > 0).all())
    assert bool(((estimate.estimate - closed_form).abs() < 4 * estimate.standard_error).all()), (
        estimate,
        closed_form,
    )


def test_the_mixture_density_matches_torch_mixture_same_family():
    generator = torch.Generator().manual_seed(1)
    mu = torch.randn(7, 3, generator=generator, dtype=torch.float64)
    logvar = torch.randn(7, 3, generator=generator, dtype=torch.float64)
    z = 2 * torch.randn(5, 2, 3, generator=generator, dtype=torch.float64)
    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=torch.zeros(7, dtype=torch.float64)),
        torch.distributions.Independent(torch.distributions.Normal(mu, (0.5 * logvar).exp()), 1),
    )
    torch.testing.assert_close(log_mixture_density(z, mu, logvar), mixture.log_prob(z))


def test_the_model_prior_is_the_mixture_of_its_posteriors_at_the_pseudo_inputs():
    model = small()
    z = torch.randn(3, 4)
    mu, logvar = model.encode(model.pseudo_inputs())
    assert mu.shape == (5, 4)
    torch.testing.assert_close(model.prior_log_density(z), log_mixture_density(z, mu, logvar))


def test_eval_path_equals_the_plain_gaussian_path_on_the_same_draws():
    model = small(StandardNormalPrior).eval()
    x = torch.bernoulli(torch.rand(6, *SHAPE))

    def bounds(m):
        return importance_weighted_bounds(m, x, 50, 16, torch.Generator().manual_seed(5))

    own, plain = bounds(model), bounds(GaussianPathOnly(model))
    assert own.kl_per_dim is None and own.kl.shape == (6,)
    torch.testing.assert_close(own.nll_iw, plain.nll_iw, rtol=0, atol=1e-4)
    torch.testing.assert_close(own.recon, plain.recon, rtol=0, atol=1e-5)
    # Monte Carlo over 50 draws against the closed form: close, not equal.
    torch.testing.assert_close(own.kl, plain.kl, rtol=0, atol=0.5)
    assert not torch.equal(own.kl, plain.kl)


def test_the_pseudo_inputs_stay_in_the_data_range_and_learn_from_the_kl():
    model = small(latent_dim=2)
    with torch.no_grad():
        model.pseudo_input_logits.mul_(100)
    inputs = model.pseudo_inputs().detach()
    assert float(inputs.min()) >= 0.0 and float(inputs.max()) <= 1.0
    loss, terms = model.compute_terms(torch.bernoulli(torch.rand(8, *SHAPE)), step=0)
    terms["kl"].backward()
    assert float(model.pseudo_input_logits.grad.abs().sum()) > 0


def test_samples_come_from_the_prior_and_the_grid_repeats():
    model = small().eval()
    first, again = model.sample(10), model.sample(10)
    assert first.shape == (10, *SHAPE) and torch.equal(first, again)
    assert float(first.min()) >= 0 and float(first.max()) <= 1  # Bernoulli means
    assert model.sample(100).shape == (100, *SHAPE)  # beyond the fixed draws


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"free_bits": 0.5}, "model.free_bits"),
        ({"kl_schedule": "linear", "free_bits": 1.0}, "model.free_bits"),
        ({"kl_samples": 1}, "model.kl_samples"),
        ({"num_pseudo_inputs": 0}, "model.num_pseudo_inputs"),
    ],
)
def test_bad_settings_name_their_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small(**kwargs)


@pytest.mark.slow
def test_a_digits_run_trains_logs_and_evaluates(tmp_path):
    proc = run_cli(
        "vae-train",
        "model=vampprior",
        "model.num_pseudo_inputs=20",
        "trainer.max_epochs=1",
        *QUICK,
        cwd=tmp_path,
    )
    run_dir = Path(last_line(proc.stdout))
    events = load_events(run_dir)
    scalars = events.Tags()["scalars"]
    for tag in (tags.VAL_KL, tags.VAL_ELBO, tags.VAL_ACTIVE_UNITS, tags.VAL_MUTUAL_INFO):
        assert tag in scalars, tag
    assert tags.VAL_SAMPLES in events.Tags()["images"]
    assert tags.VAL_KL_PER_DIM not in events.Tags()["histograms"]  # no per-dimension KL

    run_cli(
        "vae-eval",
        f"ckpt_path='{run_dir}'",
        *QUICK_EVAL,
        cwd=tmp_path,
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics[tags.TEST_NUM_EXAMPLES] == 16 and metrics[tags.TEST_IMPORTANCE_SAMPLES] == 2
    assert tags.TEST_KL_PER_DIM not in metrics
    assert math.isclose(
        metrics[tags.TEST_ELBO], -(metrics[tags.TEST_RECON] + metrics[tags.TEST_KL]), rel_tol=1e-9
    )
    parts = sum(metrics[tags.tag("test", name)] for name in tags.KL_DECOMPOSITION)
    assert math.isclose(parts, metrics[tags.TEST_KL], abs_tol=1e-5)
    assert 5.0 < metrics[tags.TEST_NLL_IW] < 100.0
    assert tags.TEST_NLL_IW in load_events(run_dir).Tags()["scalars"]
