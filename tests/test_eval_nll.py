"""IW-NLL against the closed-form likelihood of probabilistic PCA, plus its numerics and chunking.

Linear-Gaussian model (Tipping & Bishop 1999): z ~ N(0, I_D), x | z ~ N(W z + b, s^2 I_P), so
p(x) = N(b, W W^T + s^2 I) exactly, and the posterior is Gaussian,
q*(z|x) = N(M^-1 W^T (x - b), s^2 M^-1) with M = W^T W + s^2 I. Choosing W with orthogonal
columns makes M diagonal, so q* is exactly representable by a diagonal-Gaussian encoder.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vae.eval import (
    diagonal_gaussian_log_density,
    importance_weighted_bounds,
    importance_weighted_nll,
    standard_normal_log_density,
)
from vae.eval.nll import reconstruction_nll_of_draws
from vae.eval.suite import gaussian_vae_metrics
from vae.losses import gaussian_nll
from vae.models import GaussianVAE
from vae.training import tags

DTYPE = torch.float64
LATENT, PIXELS, SIGMA = 3, 6, 0.5


class LinearGaussianVAE(nn.Module):
    """PPCA decoder with an affine diagonal-Gaussian encoder (exact or deliberately wrong)."""

    likelihood_name = "gaussian"

    def __init__(self, W, b, sigma, enc_matrix, enc_offset, enc_logvar):
        super().__init__()
        self.W, self.b, self.logvar = W, b, 2 * math.log(sigma)
        self.enc_matrix, self.enc_offset, self.enc_logvar = enc_matrix, enc_offset, enc_logvar
        self.latent_dim = W.shape[1]
        self.decode_rows: list[int] = []

    def encode(self, x):
        mu = x @ self.enc_matrix.T + self.enc_offset
        return mu, self.enc_logvar.expand_as(mu)

    def decode(self, z):
        self.decode_rows.append(math.prod(z.shape[:-1]))
        return z @ self.W.T + self.b

    def reconstruction_nll(self, params, x):
        return gaussian_nll(params, x, logvar=self.logvar)


def ppca(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(PIXELS, LATENT, generator=generator, dtype=DTYPE))
    scales = torch.tensor([2.0, 1.0, 0.5], dtype=DTYPE)
    W = q * scales  # orthogonal columns: W^T W = diag(scales^2)
    b = torch.randn(PIXELS, generator=generator, dtype=DTYPE)
    return W, b


def exact_posterior(W, b, sigma):
    m_diag = (W * W).sum(0) + sigma**2  # M = W^T W + s^2 I, diagonal
    enc_matrix = W.T / m_diag.unsqueeze(1)  # M^-1 W^T
    return enc_matrix, -enc_matrix @ b, torch.log(sigma**2 / m_diag)


def exact_nll(W, b, sigma, x):
    covariance = W @ W.T + sigma**2 * torch.eye(PIXELS, dtype=DTYPE)
    return -torch.distributions.MultivariateNormal(b, covariance).log_prob(x)


def exact_negative_elbo(model, x):
    """-ELBO in closed form: -E_q log p(x|z) + KL(q || N(0, I)) for the linear-Gaussian model."""
    mu, logvar = model.encode(x)
    var = logvar.exp()
    residual = x - mu @ model.W.T - model.b
    trace = (var * (model.W * model.W).sum(0)).sum(-1)  # tr(W diag(var) W^T)
    s2 = SIGMA**2
    expected_nll = 0.5 * PIXELS * math.log(2 * math.pi * s2) + (
        residual.square().sum(-1) + trace
    ) / (2 * s2)
    kl = 0.5 * (var + mu.square() - 1 - logvar).sum(-1)
    return expected_nll + kl


def data(W, b, n, seed=1):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n, LATENT, generator=generator, dtype=DTYPE)
    return z @ W.T + b + SIGMA * torch.randn(n, PIXELS, generator=generator, dtype=DTYPE)


@pytest.mark.parametrize("k,chunk_size", [(1, 1), (10, 3), (257, 64)])
def test_exact_posterior_gives_the_exact_nll_for_any_k(k, chunk_size):
    W, b = ppca()
    model = LinearGaussianVAE(W, b, SIGMA, *exact_posterior(W, b, SIGMA))
    x = data(W, b, 50)
    generator = torch.Generator().manual_seed(0)
    nll = importance_weighted_nll(model, x, k, chunk_size, generator)
    # With q = p(z|x) every weight p(x, z)/q(z|x) equals p(x): no Monte Carlo error at all.
    torch.testing.assert_close(nll, exact_nll(W, b, SIGMA, x), rtol=0, atol=1e-9)


def test_wrong_encoder_bound_tightens_with_k_towards_the_exact_nll():
    W, b = ppca()
    enc_matrix, enc_offset, enc_logvar = exact_posterior(W, b, SIGMA)
    # Shrunk, shifted and too wide: an amortisation gap of about 1.2 nats per example.
    model = LinearGaussianVAE(W, b, SIGMA, 0.8 * enc_matrix, enc_offset + 0.3, enc_logvar + 0.7)
    x = data(W, b, 400)
    exact = exact_nll(W, b, SIGMA, x)
    elbo_gap = float((exact_negative_elbo(model, x) - exact).mean())  # -ELBO - NLL > 0
    assert elbo_gap > 1.0  # the wrong encoder really is wrong
    generator = torch.Generator().manual_seed(0)
    gaps, errors = {}, {}
    for k in (1, 10, 100, 1000, 5000):
        bounds = importance_weighted_bounds(model, x, k, chunk_size=500, generator=generator)
        excess = bounds.nll_iw - exact
        gaps[k] = float(excess.mean())
        errors[k] = 3.0 * float(excess.std() / math.sqrt(x.shape[0]))  # 3 Monte Carlo s.e.
        # NLL <= NLL_iw(k) <= -ELBO (k = 1 is -ELBO in expectation, hence the noise term).
        assert -errors[k] < gaps[k] < elbo_gap + errors[k], (k, gaps[k], errors[k])
        # Its bias falls like 1/k (Burda et al. 2016): a tolerance that shrinks with k.
        assert abs(gaps[k]) < 3.0 * elbo_gap / k + errors[k], (k, gaps[k], errors[k])
    ks = sorted(gaps)
    for small, large in zip(ks, ks[1:], strict=False):
        assert gaps[small] - gaps[large] > -(errors[small] + errors[large]), gaps
    assert gaps[10] < 0.2 * elbo_gap and abs(gaps[5000]) < 0.01, gaps


def test_one_estimate_can_fall_below_the_nll_only_its_expectation_cannot():
    # The module docstring's claim, per example: E[L_k(x)] <= log p(x), but single draws of
    # L_k(x) land on both sides of log p(x) once the bias (~ gap / k) is below the noise.
    W, b = ppca()
    enc_matrix, enc_offset, enc_logvar = exact_posterior(W, b, SIGMA)
    model = LinearGaussianVAE(W, b, SIGMA, 0.8 * enc_matrix, enc_offset + 0.3, enc_logvar + 0.7)
    x = data(W, b, 1)
    exact = float(exact_nll(W, b, SIGMA, x))
    repeats = x.expand(2000, -1)  # 2000 independent estimates of the same example
    nll_iw = importance_weighted_nll(
        model, repeats, 100, generator=torch.Generator().manual_seed(0)
    )
    below = int((nll_iw < exact).sum())
    assert 0 < below < nll_iw.numel(), below  # single estimates fall below the NLL ...
    standard_error = float(nll_iw.std()) / math.sqrt(nll_iw.numel())
    assert float(nll_iw.mean()) > exact - 3.0 * standard_error  # ... their mean does not


def test_chunking_bounds_the_decoder_batch_and_not_the_result():
    W, b = ppca()
    enc = exact_posterior(W, b, SIGMA)
    model = LinearGaussianVAE(W, b, SIGMA, enc[0], enc[1] + 0.2, enc[2] + 0.5)
    x = data(W, b, 8)
    results = []
    for chunk_size in (1, 37, 5000):
        model.decode_rows.clear()
        generator = torch.Generator().manual_seed(3)
        results.append(importance_weighted_nll(model, x, 5000, chunk_size, generator))
        assert max(model.decode_rows) == 8 * min(chunk_size, 5000)
        assert sum(model.decode_rows) == 8 * 5000
    # Different chunkings draw different samples; with k = 5000 they agree within noise.
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=0, atol=0.05)


def test_gaussian_log_densities_match_torch_distributions():
    generator = torch.Generator().manual_seed(0)
    z, mu = torch.randn(2, 5, 4, generator=generator, dtype=DTYPE)
    logvar = torch.randn(5, 4, generator=generator, dtype=DTYPE)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    torch.testing.assert_close(diagonal_gaussian_log_density(z, mu, logvar), q.log_prob(z).sum(-1))
    prior = torch.distributions.Normal(torch.zeros(()), torch.ones(()))
    torch.testing.assert_close(standard_normal_log_density(z), prior.log_prob(z).sum(-1))


def test_a_bernoulli_vae_estimate_is_reproducible_and_chunking_only_changes_the_draws():
    torch.manual_seed(0)
    model = GaussianVAE(image_shape=(1, 8, 8), hidden_dims=[32], latent_dim=4).eval()
    x = torch.bernoulli(torch.rand(6, 1, 8, 8))

    def bounds(chunk_size, seed=5):
        return importance_weighted_bounds(
            model, x, 50, chunk_size, torch.Generator().manual_seed(seed)
        )

    first, again = bounds(16), bounds(16)  # 50 = 3 chunks of 16 and one of 2
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    assert first.nll_iw.shape == first.recon.shape == (6,) and first.kl_per_dim.shape == (6, 4)
    # L_k is a log-mean-exp of the same log weights whose mean is the ELBO estimate (up to the
    # KL being exact rather than sampled), so it sits above it.
    assert bool((first.nll_iw <= -first.elbo + 1e-3).all())
    other = bounds(7, seed=6)
    torch.testing.assert_close(other.nll_iw, first.nll_iw, rtol=0, atol=1.0)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"k": 0}, "k must be a positive integer"), ({"k": 5, "chunk_size": 0}, "chunk_size")],
)
def test_bad_arguments_name_themselves(kwargs, match):
    model = GaussianVAE(image_shape=(1, 8, 8), hidden_dims=[8], latent_dim=2)
    with pytest.raises(ValueError, match=match):
        importance_weighted_nll(model, torch.rand(2, 1, 8, 8), **kwargs)


def test_a_model_without_the_protocol_is_refused():
    with pytest.raises(ValueError, match="encode"):
        importance_weighted_nll(nn.Linear(2, 2), torch.rand(2, 2), 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_bernoulli_vae_on_cuda_agrees_with_cpu_within_noise():
    torch.manual_seed(0)
    model = GaussianVAE(image_shape=(1, 8, 8), hidden_dims=[32], latent_dim=4).eval()
    x = torch.bernoulli(torch.rand(6, 1, 8, 8))
    on_cpu = importance_weighted_nll(model, x, 2000, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator(device="cuda").manual_seed(0)
    on_cuda = importance_weighted_nll(model.cuda(), x.cuda(), 2000, generator=generator)
    assert on_cuda.is_cuda
    # Independent draws: at k = 2000 one estimate has a Monte Carlo s.d. of about 0.02 nats.
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, rtol=0, atol=0.2)


class SelfWeighingPPCA(LinearGaussianVAE):
    """The PPCA model through the second protocol: it draws and weighs its own samples."""

    def __init__(self, *args, decompose: bool = True):
        super().__init__(*args)
        self.reports_kl_decomposition = decompose
        self.sample_calls: list[int] = []

    def importance_sample(self, x, num_samples, generator):
        self.sample_calls.append(num_samples)
        mu, logvar = self.encode(x)
        eps = torch.randn(
            (x.shape[0], num_samples, mu.shape[-1]), generator=generator, dtype=mu.dtype
        )
        z = mu.unsqueeze(1) + (0.5 * logvar).exp().unsqueeze(1) * eps
        recon = reconstruction_nll_of_draws(self, self.decode(z), x)
        log_q = diagonal_gaussian_log_density(z, mu.unsqueeze(1), logvar.unsqueeze(1))
        return standard_normal_log_density(z) - log_q - recon, recon


@pytest.mark.parametrize("k,chunk_size", [(1, 1), (10, 3), (257, 64)])
def test_a_model_with_its_own_importance_sample_gets_the_exact_nll_chunk_by_chunk(k, chunk_size):
    W, b = ppca()
    model = SelfWeighingPPCA(W, b, SIGMA, *exact_posterior(W, b, SIGMA))
    x = data(W, b, 50)
    bounds = importance_weighted_bounds(model, x, k, chunk_size, torch.Generator().manual_seed(0))
    torch.testing.assert_close(bounds.nll_iw, exact_nll(W, b, SIGMA, x), rtol=0, atol=1e-9)
    assert model.sample_calls == [min(chunk_size, k - s) for s in range(0, k, chunk_size)]
    assert bounds.kl_per_dim is None and bounds.kl.shape == (50,)
    torch.testing.assert_close(bounds.elbo, -(bounds.recon + bounds.kl))


def test_the_own_path_kl_is_the_monte_carlo_mean_of_log_q_minus_log_p():
    W, b = ppca()
    enc = exact_posterior(W, b, SIGMA)
    model = SelfWeighingPPCA(W, b, SIGMA, enc[0], enc[1] + 0.3, enc[2] + 0.7)
    x = data(W, b, 20)
    own = importance_weighted_bounds(model, x, 20000, generator=torch.Generator().manual_seed(1))
    closed_form = 0.5 * (model.encode(x)[1].exp() + model.encode(x)[0].square() - 1).sum(-1)
    closed_form = closed_form - 0.5 * model.encode(x)[1].sum(-1)
    torch.testing.assert_close(own.kl, closed_form, rtol=0, atol=0.05)
    # and the same draws through the built-in Gaussian path give the same log weights
    plain = importance_weighted_bounds(
        LinearGaussianVAE(W, b, SIGMA, enc[0], enc[1] + 0.3, enc[2] + 0.7),
        x,
        20000,
        generator=torch.Generator().manual_seed(1),
    )
    torch.testing.assert_close(own.nll_iw, plain.nll_iw, rtol=0, atol=1e-9)
    torch.testing.assert_close(own.recon, plain.recon, rtol=0, atol=1e-9)


def test_an_importance_sample_of_the_wrong_shape_is_refused():
    W, b = ppca()
    model = SelfWeighingPPCA(W, b, SIGMA, *exact_posterior(W, b, SIGMA))
    model.importance_sample = lambda x, s, g: (torch.zeros(x.shape[0]), torch.zeros(x.shape[0]))
    with pytest.raises(ValueError, match="importance_sample must return"):
        importance_weighted_bounds(model, data(W, b, 4), 3)


@pytest.mark.parametrize("decompose", [True, False])
def test_split_metrics_of_a_self_weighing_model_have_no_kl_per_dim(decompose):
    W, b = ppca()
    enc = exact_posterior(W, b, SIGMA)
    model = SelfWeighingPPCA(W, b, SIGMA, enc[0], enc[1] + 0.3, enc[2] + 0.7, decompose=decompose)
    x = data(W, b, 60)
    metrics = gaussian_vae_metrics(
        model, [x[:32], x[32:]], 50, generator=torch.Generator().manual_seed(0)
    )
    assert tags.TEST_KL_PER_DIM not in metrics
    assert metrics[tags.TEST_NUM_EXAMPLES] == 60 and metrics[tags.TEST_ACTIVE_UNITS] == LATENT
    assert math.isclose(
        metrics[tags.TEST_ELBO], -(metrics[tags.TEST_RECON] + metrics[tags.TEST_KL]), rel_tol=1e-12
    )
    names = [tags.tag("test", name) for name in tags.KL_DECOMPOSITION]
    if decompose:  # the model's own KL is split: the three still add up to it
        assert math.isclose(sum(metrics[n] for n in names), metrics[tags.TEST_KL], rel_tol=1e-6)
    else:
        assert not any(n in metrics for n in names)
