"""beta-TCVAE (model=beta_tcvae): the three weighted parts add up to a Monte Carlo KL, beta
weighs only the total correlation, N comes from the DataModule, and a real vae-train run.
(The MSS and MWS estimators themselves are tested in tests/test_kl_decomposition.py.)"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.cli import QUICK, last_line, load_events, read_metrics, run_cli, scalar_series
from vae.data import DigitsDataModule
from vae.losses import BetaKL
from vae.models.beta_tcvae import BetaTCVAE, kl_split
from vae.models.gaussian_vae import GaussianVAE

TINY = {"image_shape": (1, 4, 4), "hidden_dims": [16], "latent_dim": 3, "data_levels": 2}
PARTS = ("mutual_info_mb", "total_correlation_mb", "dimwise_kl_mb")


def _batch(examples: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.bernoulli(torch.full((examples, 1, 4, 4), 0.4), generator=generator)


def _model(**kwargs) -> BetaTCVAE:
    torch.manual_seed(0)
    return BetaTCVAE(**TINY, dataset_size=1000, **kwargs).eval()


def _terms(model, x, seed: int = 5):
    torch.manual_seed(seed)
    return model.compute_terms(x, step=0)


@pytest.mark.parametrize("estimator", ["mss", "mws"])
def test_the_three_parts_add_up_to_the_monte_carlo_kl_at_the_draw(estimator):
    torch.manual_seed(1)
    mu, logvar = torch.randn(6, 3), torch.randn(6, 3)
    eps = torch.randn(6, 3)
    z = mu + torch.exp(0.5 * logvar) * eps
    parts = kl_split(z, eps, mu, logvar, dataset_size=100, estimator=estimator)
    posterior = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(0.0, 1.0)
    mc_kl = (posterior.log_prob(z) - prior.log_prob(z)).sum(-1)
    assert torch.allclose(sum(parts.values()), mc_kl, atol=1e-5)
    assert all(value.shape == (6,) and torch.isfinite(value).all() for value in parts.values())


@pytest.mark.parametrize("estimator", ["mss", "mws"])
@torch.no_grad()
def test_unit_weights_give_the_vae_loss_and_the_parts_add_up_to_the_monte_carlo_kl(estimator):
    model, x = _model(estimator=estimator), _batch()
    torch.manual_seed(0)
    vae = GaussianVAE(**TINY).eval()
    vae.load_state_dict(model.state_dict())
    loss, terms = _terms(model, x)
    vae_loss, vae_terms = _terms(vae, x)
    torch.manual_seed(5)
    eps = torch.randn(x.shape[0], 3)
    mu, logvar = model.encode(x)
    z = mu + torch.exp(0.5 * logvar) * eps
    mc_kl = 0.5 * (z.square() - eps.square() - logvar).sum(-1)
    parts = kl_split(z, eps, mu, logvar, dataset_size=1000, estimator=estimator)
    for name in PARTS:  # the model's estimator and N reach the estimates
        assert float(terms[name]) == pytest.approx(float(parts[name].mean()), rel=1e-5, abs=1e-6)
    for name in ("recon", "kl", "elbo"):  # the reported terms are the Gaussian VAE's
        assert float(terms[name]) == pytest.approx(float(vae_terms[name]), rel=1e-6)
    assert float(sum(terms[name] for name in PARTS)) == pytest.approx(float(mc_kl.mean()), abs=1e-5)
    assert float(loss) == pytest.approx(float(vae_loss), rel=1e-6)  # the closed-form KL stands in


@torch.no_grad()
def test_unit_weights_match_the_closed_form_kl_in_expectation():
    model, x = _model(), _batch()
    torch.manual_seed(9)
    draws = []
    for _ in range(500):
        loss, terms = model.compute_terms(x, step=0)
        draws.append(float(sum(terms[name] for name in PARTS)))
    draws = torch.tensor(draws, dtype=torch.float64)
    standard_error = float(draws.std()) / math.sqrt(len(draws))
    closed_form = float(terms["kl"])
    assert abs(float(draws.mean()) - closed_form) < 4 * standard_error


@torch.no_grad()
def test_beta_weighs_the_total_correlation_and_nothing_else():
    x = _batch()
    loss_1, terms_1 = _terms(_model(), x)
    loss_6, terms_6 = _terms(_model(beta=6.0), x)
    for name in ("recon", "kl", "elbo", *PARTS):  # same draw: only the weights differ
        assert float(terms_6[name]) == pytest.approx(float(terms_1[name]), rel=1e-6, abs=1e-7)
    tc = float(terms_1["total_correlation_mb"])
    assert float(loss_6 - loss_1) == pytest.approx(5 * tc, rel=1e-4, abs=1e-6)
    # model.beta never reaches a KL regulariser (it would count twice): the one built is plain
    regulariser = _model(beta=6.0).regulariser
    assert type(regulariser) is BetaKL and regulariser.schedule.beta == 1.0


def test_loss_gradient_on_each_part_is_its_weight_less_the_one_in_the_closed_form_kl():
    model, x = _model(alpha=0.5, beta=6.0, gamma=2.0), _batch()
    model.train()
    loss, terms = _terms(model, x)
    gradients = torch.autograd.grad(loss, [terms["kl"], *(terms[name] for name in PARTS)])
    assert [float(g) for g in gradients] == pytest.approx([1.0, -0.5, 5.0, 1.0])


def test_the_expected_gradient_is_that_of_chen_et_al_s_monte_carlo_form():
    model, x = _model(alpha=0.5, beta=6.0, gamma=2.0), _batch()
    model.train()
    differences = []
    for seed in range(500):  # paired: both losses from the same draw
        loss, terms = _terms(model, x, seed)
        weights = (0.5, 6.0, 2.0)
        chen = terms["recon"] + sum(w * terms[name] for w, name in zip(weights, PARTS, strict=True))
        gradient = torch.autograd.grad(loss - chen, list(model.encoder.parameters()))
        differences.append(torch.cat([g.flatten() for g in gradient]))
    differences = torch.stack(differences).double()
    spread = differences.std(0)
    moving = spread > 0  # inputs that are 0 in every example give a 0 gradient in both
    t_statistics = differences.mean(0)[moving] / (spread[moving] / math.sqrt(len(differences)))
    # measured: max |t| 2.5; the KL left out of the loss gives 14, the KL at half weight 7
    assert moving.sum() > 100 and t_statistics.abs().max() < 5


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"estimator": "stratified"}, "model.estimator"),
        ({"alpha": -1.0}, "model.alpha"),
        ({"beta": -0.5}, "model.beta"),
        ({"gamma": "1"}, "model.gamma"),
        ({"dataset_size": 1}, "model.dataset_size"),
        ({"kl_schedule": "linear"}, "model.kl_schedule"),
        ({"free_bits": 0.5}, "model.free_bits"),
        (
            {"regulariser": {"_target_": "vae.losses.kl_regulariser", "beta": 6}},
            "model.regulariser",
        ),
    ],
)
def test_bad_keys_are_refused_by_name(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        BetaTCVAE(**TINY, **kwargs)


def test_dataset_size_comes_from_the_train_split_unless_given():
    datamodule = DigitsDataModule()
    datamodule.setup("fit")
    image_shape = {"image_shape": DigitsDataModule.image_shape, "hidden_dims": [8]}
    read, given = BetaTCVAE(**image_shape), BetaTCVAE(**image_shape, dataset_size=500)
    for model in (read, given):
        model.trainer = SimpleNamespace(datamodule=datamodule)
        model.setup("fit")
    assert read.dataset_size == len(datamodule.train_split) > 1000
    assert given.dataset_size == 500
    with pytest.raises(ValueError, match=r"model\.dataset_size"):
        BetaTCVAE(**TINY).compute_terms(_batch(), step=0)


@pytest.mark.slow
def test_vae_train_logs_the_minibatch_estimates(tmp_path: Path):
    proc = run_cli(
        "vae-train",
        "model=beta_tcvae",
        "model.beta=4",
        "model.estimator=mws",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=6",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=2",
        *QUICK,
        cwd=tmp_path,
    )
    run_dir = tmp_path / last_line(proc.stdout)
    assert run_dir.parent.name == "beta_tcvae_digits"
    events = load_events(run_dir)
    for name in PARTS:
        series = scalar_series(events, f"train/{name}")
        assert len(series) == 3 and all(math.isfinite(value) for _, value in series), name
        assert f"val/{name}" not in events.Tags()["scalars"]
    assert "train/beta" not in events.Tags()["scalars"]  # model.beta is no KL weight here
    metrics = read_metrics(run_dir)
    assert metrics["val/elbo"] == pytest.approx(-(metrics["val/recon"] + metrics["val/kl"]))
    assert "val/total_correlation" in metrics  # the whole split's decomposition, as for a VAE


def test_rebuilt_from_its_saved_hyper_parameters_with_the_same_weights():
    model = BetaTCVAE(**TINY, alpha=0.5, beta=6.0, gamma=2.0, estimator="mws")
    rebuilt = BetaTCVAE(**dict(model.hparams))  # what load_from_checkpoint does
    assert rebuilt.weights == model.weights and rebuilt.estimator == "mws"
