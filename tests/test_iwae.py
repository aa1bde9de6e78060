"""IWAE (model=iwae): the k-sample bound against the ELBO and vae-eval's IW-NLL, refused keys, and
a real vae-train / vae-eval run on the digits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.cli import (
    QUICK,
    QUICK_EVAL,
    last_line,
    load_events,
    read_metrics,
    run_cli,
    scalar_series,
)
from vae.eval.nll import importance_weighted_bounds
from vae.models.gaussian_vae import GaussianVAE
from vae.models.iwae import IWAE

TINY = {"image_shape": (1, 4, 4), "hidden_dims": [16], "latent_dim": 2, "data_levels": 2}


def _batch(examples: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.bernoulli(torch.full((examples, 1, 4, 4), 0.4), generator=generator)


def _tiny_pair(k: int = 1) -> tuple[GaussianVAE, IWAE]:
    torch.manual_seed(0)
    vae = GaussianVAE(**TINY).eval()
    iwae = IWAE(**TINY, k=k).eval()
    iwae.load_state_dict(vae.state_dict())
    return vae, iwae


def _mean_and_standard_error(draws: list[torch.Tensor]) -> tuple[float, float]:
    values = torch.stack(draws).double()
    return float(values.mean()), float(values.std() / math.sqrt(len(draws)))


@torch.no_grad()
def test_one_sample_bound_is_the_elbo_with_a_monte_carlo_kl_from_the_same_draw():
    vae, iwae = _tiny_pair(k=1)
    x = _batch()
    torch.manual_seed(5)
    vae_loss, vae_terms = vae.compute_terms(x, step=0)
    torch.manual_seed(5)
    iwae_loss, iwae_terms = iwae.compute_terms(x, step=0)
    torch.manual_seed(5)
    eps = torch.randn(x.shape[0], 2)  # the draw both models took
    mu, logvar = vae.encode(x)
    z = mu + torch.exp(0.5 * logvar) * eps
    # log q(z|x) - log p(z) at that draw, from torch.distributions
    posterior = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(torch.zeros_like(z), torch.ones_like(z))
    mc_kl = (posterior.log_prob(z) - prior.log_prob(z)).sum(-1).mean()
    assert iwae_terms["recon"] == pytest.approx(float(vae_terms["recon"]), rel=1e-6)
    assert iwae_terms["kl"] == pytest.approx(float(vae_terms["kl"]), rel=1e-6)
    assert iwae_terms["elbo"] == pytest.approx(float(vae_terms["elbo"]), rel=1e-6)
    assert float(iwae_loss) == pytest.approx(float(vae_loss - vae_terms["kl"] + mc_kl), abs=1e-4)
    assert float(iwae_terms["iw_bound"]) == pytest.approx(-float(iwae_loss))


@torch.no_grad()
def test_one_sample_loss_matches_the_vae_loss_in_expectation():
    vae, iwae = _tiny_pair(k=1)
    x = _batch().repeat(50, 1, 1, 1)
    torch.manual_seed(11)
    vae_mean, vae_se = _mean_and_standard_error([vae.compute_terms(x, 0)[0] for _ in range(200)])
    iwae_mean, iwae_se = _mean_and_standard_error([iwae.compute_terms(x, 0)[0] for _ in range(200)])
    assert abs(iwae_mean - vae_mean) < 4 * math.hypot(vae_se, iwae_se)


def test_one_sample_gradient_matches_the_vae_gradient_in_expectation():
    vae, iwae = _tiny_pair(k=1)
    x = _batch()
    differences = []
    for seed in range(500):  # paired: both from the same draw
        gradients = []
        for model in (iwae, vae):
            torch.manual_seed(seed)
            loss, _ = model.compute_terms(x, step=0)
            grads = torch.autograd.grad(loss, list(model.encoder.parameters()))
            gradients.append(torch.cat([g.flatten() for g in grads]))
        differences.append(gradients[0] - gradients[1])
    differences = torch.stack(differences).double()
    spread = differences.std(0)
    moving = spread > 0  # inputs that are 0 in every example give a 0 gradient in both
    t_statistics = differences.mean(0)[moving] / (spread[moving] / math.sqrt(len(differences)))
    assert moving.sum() > 100 and t_statistics.abs().max() < 5  # measured: 2.9


@torch.no_grad()
def test_bound_rises_with_k_and_stays_below_the_evaluated_log_likelihood():
    _, iwae = _tiny_pair()
    x = _batch()
    torch.manual_seed(7)
    bounds = {}
    for k in (1, 5, 50):
        iwae.k = k
        bounds[k] = _mean_and_standard_error(
            [iwae.compute_terms(x, 0)[1]["iw_bound"] for _ in range(1000)]
        )
    (mean_1, se_1), (mean_5, se_5), (mean_50, se_50) = bounds[1], bounds[5], bounds[50]
    assert mean_1 + 3 * math.hypot(se_1, se_5) < mean_5
    assert mean_5 + 3 * math.hypot(se_5, se_50) < mean_50
    # vae-eval's estimate with many samples: E[L_50] <= E[L_5000] <= log p(x)
    many = importance_weighted_bounds(iwae, x, k=5000, generator=torch.Generator().manual_seed(0))
    assert mean_50 <= float(-many.nll_iw.mean()) + 3 * se_50


def _gradients(model: IWAE, x: torch.Tensor, seed: int):
    model.zero_grad()
    torch.manual_seed(seed)
    loss, _ = model.compute_terms(x, step=0)
    loss.backward()
    encoder, decoder = (
        torch.cat([p.grad.flatten() for p in net.parameters()])
        for net in (model.encoder, model.decoder)
    )
    return loss.detach(), encoder, decoder


def test_dreg_keeps_the_decoder_gradient_and_the_encoder_gradients_expectation():
    torch.manual_seed(0)
    iwae = IWAE(**TINY, k=5).train()
    dreg = IWAE(**TINY, k=5, gradient_estimator="dreg").train()
    dreg.load_state_dict(iwae.state_dict())
    x = _batch(4)
    differences, iwae_encoder, dreg_encoder = [], [], []
    for seed in range(400):  # the same draws for both: a paired comparison
        loss, encoder, decoder = _gradients(iwae, x, seed)
        dreg_loss, dreg_enc, dreg_dec = _gradients(dreg, x, seed)
        assert float(dreg_loss) == pytest.approx(float(loss), abs=1e-5)
        assert torch.allclose(dreg_dec, decoder, atol=1e-5)
        differences.append(dreg_enc - encoder)
        iwae_encoder.append(encoder)
        dreg_encoder.append(dreg_enc)
    differences = torch.stack(differences).double()
    spread = differences.std(0)
    moving = spread > 0  # inputs that are 0 in every example give both estimators a 0
    t_statistics = differences.mean(0)[moving] / (spread[moving] / math.sqrt(len(differences)))
    # 198 coordinates: |t| < 5 everywhere for unbiased estimators (STL's w~ weights give |t| ~ 35)
    assert t_statistics.abs().max() < 5
    total_variance = [torch.stack(g).double().var(0).sum() for g in (iwae_encoder, dreg_encoder)]
    assert total_variance[1] < total_variance[0] / 10  # measured: 0.005 against 0.53


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"k": 0}, "model.k"),
        ({"k": 2.5}, "model.k"),
        ({"gradient_estimator": "reinforce"}, "model.gradient_estimator"),
        ({"beta": 4.0}, "model.beta"),
        ({"kl_schedule": "linear"}, "model.kl_schedule"),
        ({"free_bits": 0.5}, "model.free_bits"),
        (
            {"regulariser": {"_target_": "vae.losses.kl_regulariser", "beta": 2.0}},
            "model.regulariser",
        ),
    ],
)
def test_keys_that_do_not_define_a_bound_are_refused_by_name(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        IWAE(**TINY, **kwargs)


def test_all_k_samples_go_through_the_decoder_in_one_call():
    _, iwae = _tiny_pair(k=7)
    rows = []
    iwae.decoder.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    iwae.compute_terms(_batch(3), step=0)
    assert rows == [21]


@pytest.mark.slow
def test_vae_train_logs_the_bound_and_vae_eval_reads_the_run(tmp_path: Path):
    proc = run_cli(
        "vae-train",
        "model=iwae",
        "model.k=3",
        "model.gradient_estimator=dreg",  # the training step's own autograd.grad, in Lightning
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=5",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=2",
        *QUICK,
        cwd=tmp_path,
    )
    run_dir = tmp_path / last_line(proc.stdout)
    assert run_dir.parent.name == "iwae_digits"
    events = load_events(run_dir)
    train_bound = scalar_series(events, "train/iw_bound")
    val_bound = scalar_series(events, "val/iw_bound")
    assert train_bound and len(val_bound) == 2
    assert all(math.isfinite(value) and value < 0 for _, value in train_bound + val_bound)
    metrics = read_metrics(run_dir)
    # E[L_3] >= the ELBO; over two validation batches the estimate keeps that order clearly
    assert metrics["val/iw_bound"] > metrics["val/elbo"]
    assert metrics["val/loss"] == pytest.approx(-metrics["val/iw_bound"], rel=1e-6)

    run_cli(
        "vae-eval",
        f"ckpt_path='{run_dir}'",
        *QUICK_EVAL,
        cwd=tmp_path,
    )
    assert read_metrics(run_dir)["test/nll_iw"] > 0
