"""The KL decomposition (vae.losses.decomposition): E_x KL(q(z|x) || p(z)) = MI + TC +
dimension-wise KL, checked against a model whose aggregate posterior is known in closed form,
and its limits (collapse, log N, chunking, bad input)."""

from __future__ import annotations

import math

import pytest
import torch

import vae.losses.decomposition as decomposition_module
from vae.eval import KLDecompositionMetric
from vae.losses import gaussian_kl, kl_decomposition, minibatch_log_densities


def linear_gaussian(num: int, seed: int = 0):
    """x ~ N(0, I_3), q(z|x) = N(A x, s2 I): q(z) = N(0, A A^T + s2 I) exactly, so

    MI = 1/2 (log det S - D log s2),  TC = 1/2 (sum log S_jj - log det S),
    dimension-wise KL = 1/2 sum_j (S_jj - 1 - log S_jj)."""
    x = torch.randn(num, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    a = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.8, 0.0], [0.0, 0.0, 0.3]], dtype=torch.float64)
    s2 = 0.25
    mu, logvar = x @ a.T, torch.full((num, 3), math.log(s2), dtype=torch.float64)
    cov = a @ a.T + s2 * torch.eye(3, dtype=torch.float64)
    var = torch.diagonal(cov)
    exact = {
        "mutual_info": 0.5 * (torch.logdet(cov) - 3 * math.log(s2)),
        "total_correlation": 0.5 * (var.log().sum() - torch.logdet(cov)),
        "dimwise_kl": 0.5 * (var - 1 - var.log()).sum(),
    }
    return mu, logvar, {name: float(value) for name, value in exact.items()}


def test_matches_the_closed_form_of_a_linear_gaussian_encoder():
    mu, logvar, exact = linear_gaussian(8000)
    result = kl_decomposition(mu, logvar, generator=torch.Generator().manual_seed(123))
    mi_se, tc_se = result.standard_error.tolist()
    # The empirical mixture of 8,000 posteriors stands for q(z): within 4 standard errors plus
    # the mixture's own O(1/N)-ish error.
    assert float(result.mutual_info) == pytest.approx(exact["mutual_info"], abs=4 * mi_se + 0.01)
    assert float(result.total_correlation) == pytest.approx(
        exact["total_correlation"], abs=4 * tc_se + 0.01
    )
    assert float(result.dimwise_kl) == pytest.approx(exact["dimwise_kl"], abs=0.04)
    assert 0 < mi_se < 0.05 and 0 < tc_se < 0.02


def test_the_three_terms_add_up_to_the_closed_form_mean_kl():
    mu, logvar, _ = linear_gaussian(500, seed=1)
    result = kl_decomposition(mu, logvar, num_points=100)
    mean_kl = gaussian_kl(mu, logvar).sum(-1).mean()
    torch.testing.assert_close(result.kl, mean_kl)
    torch.testing.assert_close(
        result.mutual_info + result.total_correlation + result.dimwise_kl, mean_kl
    )


def test_mutual_information_is_at_most_log_n_and_reaches_it_for_separate_posteriors():
    num = 200
    mu = 100.0 * torch.randn(num, 4, generator=torch.Generator().manual_seed(0))
    logvar = torch.full((num, 4), -6.0)
    result = kl_decomposition(mu, logvar, generator=torch.Generator().manual_seed(1))
    assert float(result.mutual_info) <= math.log(num) + 1e-9
    assert float(result.mutual_info) == pytest.approx(math.log(num), abs=1e-3)


def test_a_collapsed_posterior_has_no_kl_and_no_mutual_information():
    mu, logvar = torch.zeros(300, 5), torch.zeros(300, 5)
    result = kl_decomposition(mu, logvar)
    for value in result[:4]:
        assert float(value) == pytest.approx(0.0, abs=1e-6)


def test_chunks_do_not_change_the_numbers(monkeypatch):
    mu, logvar, _ = linear_gaussian(400, seed=2)
    whole = kl_decomposition(mu, logvar, generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(decomposition_module, "_ELEMENT_BUDGET", 3 * 400 * 7)  # 7 points a chunk
    chunked = kl_decomposition(mu, logvar, generator=torch.Generator().manual_seed(5))
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b)


def test_bits_are_nats_over_log_2():
    mu, logvar, _ = linear_gaussian(100, seed=3)
    nats = kl_decomposition(mu, logvar, generator=torch.Generator().manual_seed(0))
    bits = kl_decomposition(mu, logvar, generator=torch.Generator().manual_seed(0), unit="bits")
    for n, b in zip(nats, bits, strict=True):
        torch.testing.assert_close(b * math.log(2), n)


@pytest.mark.parametrize(
    ("mu", "logvar", "kwargs", "message"),
    [
        (torch.zeros(5, 2), torch.zeros(5, 3), {}, "mu and logvar must both have shape"),
        (torch.zeros(5), torch.zeros(5), {}, "mu and logvar must both have shape"),
        (torch.zeros(1, 2), torch.zeros(1, 2), {}, "at least 2 examples"),
        (torch.tensor([[0.0], [math.nan]]), torch.zeros(2, 1), {}, "argument 'mu' contains 1 NaN"),
        (torch.zeros(4, 2), torch.zeros(4, 2), {"num_points": 0}, "num_points must be"),
        (torch.zeros(4, 2), torch.zeros(4, 2), {"unit": "dits"}, "argument 'unit'"),
    ],
)
def test_bad_input_is_refused_naming_the_argument(mu, logvar, kwargs, message):
    with pytest.raises(ValueError, match=f"^kl_decomposition: .*{message}"):
        kl_decomposition(mu, logvar, **kwargs)


def test_the_metric_equals_the_function_on_the_whole_epoch():
    mu, logvar, _ = linear_gaussian(300, seed=4)
    metric = KLDecompositionMetric(3, num_points=100, seed=7)
    for start in range(0, 300, 64):
        metric.update(mu[start : start + 64], logvar[start : start + 64])
    got = metric.compute()
    want = kl_decomposition(
        mu.float(), logvar.float(), num_points=100, generator=torch.Generator().manual_seed(7)
    )
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        with pytest.raises(ValueError, match="at least 2 examples"):
            metric.compute()


def test_minibatch_weights_mws_and_mss():
    gen = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(8, 3, generator=gen), torch.randn(8, 3, generator=gen) * 0.1
    z = mu + (0.5 * logvar).exp() * torch.randn(8, 3, generator=gen)
    log_qz, log_qz_dims = minibatch_log_densities(z, mu, logvar, 1000, method="mws")
    log_q = decomposition_module.gaussian_log_density_per_dim(z[:, None], mu[None], logvar[None])
    torch.testing.assert_close(log_qz, torch.logsumexp(log_q.sum(-1), 1) - math.log(8000))
    torch.testing.assert_close(log_qz_dims, (torch.logsumexp(log_q, 1) - math.log(8000)).sum(-1))
    weights = decomposition_module._stratified_log_weights(8, 1000, torch.float64, "cpu").exp()
    torch.testing.assert_close(weights.sum(1), torch.ones(8, dtype=torch.float64))
    assert float(weights[0, 0]) == pytest.approx(1 / 1000)
    assert float(weights[0, 1]) == pytest.approx((1000 - 8 + 1) / (1000 * 7))
    with pytest.raises(ValueError, match="method must be 'mws' or 'mss'"):
        minibatch_log_densities(z, mu, logvar, 1000, method="full")
    with pytest.raises(ValueError, match="dataset_size must be an integer >= the batch size"):
        minibatch_log_densities(z, mu, logvar, 4)


def test_a_given_kl_replaces_the_closed_form_and_leaves_mi_and_tc():
    mu, logvar, _ = linear_gaussian(300, seed=6)
    standard = kl_decomposition(mu, logvar, generator=torch.Generator().manual_seed(0))
    other = kl_decomposition(mu, logvar, generator=torch.Generator().manual_seed(0), kl=3.5)
    torch.testing.assert_close(other.mutual_info, standard.mutual_info)
    torch.testing.assert_close(other.total_correlation, standard.total_correlation)
    assert float(other.kl) == 3.5
    assert float(other.mutual_info + other.total_correlation + other.dimwise_kl) == 3.5
    with pytest.raises(ValueError, match="argument 'kl' must be one finite number"):
        kl_decomposition(mu, logvar, kl=math.inf)
    metric = KLDecompositionMetric(3, seed=0)
    metric.update(mu, logvar, kl=torch.full((300,), 3.5))
    assert float(metric.compute().kl) == pytest.approx(3.5)
