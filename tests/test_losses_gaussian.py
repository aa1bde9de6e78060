"""Gaussian KL (diagonal and full covariance) and the Monte-Carlo KL, against oracles."""

import math
from fractions import Fraction

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from vae.losses import full_gaussian_kl, gaussian_kl, mc_kl

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _normal_oracle(mu, logvar, prior_mu, prior_logvar):
    q = Normal(mu.double(), (0.5 * logvar.double()).exp())
    p = Normal(prior_mu.double(), (0.5 * prior_logvar.double()).exp())
    return kl_divergence(q, p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_kl_matches_torch_distributions_standard_prior(dtype):
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(64, 16, generator=g, dtype=dtype) * 2
    logvar = torch.randn(64, 16, generator=g, dtype=dtype) * 3
    ours = gaussian_kl(mu, logvar)
    oracle = _normal_oracle(mu, logvar, torch.zeros(()), torch.zeros(()))
    assert ours.dtype == dtype and ours.shape == mu.shape
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(ours.double(), oracle, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_kl_matches_torch_distributions_general_prior(dtype):
    g = torch.Generator().manual_seed(1)
    mu, logvar = (torch.randn(32, 8, generator=g, dtype=dtype) for _ in range(2))
    prior_mu = torch.randn(8, generator=g, dtype=dtype)  # broadcast over the batch
    prior_logvar = torch.randn(32, 8, generator=g, dtype=dtype)
    ours = gaussian_kl(mu, logvar, prior_mu, prior_logvar)
    oracle = _normal_oracle(mu, logvar, prior_mu, prior_logvar)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(ours.double(), oracle, rtol=tol, atol=tol)


def test_gaussian_kl_accepts_number_priors_and_broadcasts():
    mu = torch.randn(4, 1, 3)
    logvar = torch.randn(5, 3)
    out = gaussian_kl(mu, logvar, prior_mu=0.5, prior_logvar=-1.0)
    assert out.shape == (4, 5, 3)
    oracle = _normal_oracle(mu, logvar, torch.tensor(0.5), torch.tensor(-1.0))
    torch.testing.assert_close(out.double(), oracle, rtol=1e-5, atol=1e-6)


def test_gaussian_kl_is_exactly_zero_at_the_prior():
    lv = torch.linspace(-30, 30, 101)
    mu = torch.randn(101)
    assert torch.equal(gaussian_kl(torch.zeros(7), torch.zeros(7)), torch.zeros(7))
    assert torch.equal(gaussian_kl(mu, lv, prior_mu=mu, prior_logvar=lv), torch.zeros(101))


def _exact_variance_term(d: float) -> float:
    """e^d - 1 - d with no rounding until the end (exact rational Taylor sum for |d| <= 1)."""
    if abs(d) > 1:
        return math.expm1(d) - d  # no cancellation out here: relative error ~1e-16
    q, term, total = Fraction(d), Fraction(d), Fraction(0)
    for k in range(2, 40):
        term = term * q / k
        total += term
    return float(total)


LOG_RATIOS = [
    sign * m
    for m in (1e-30, 1e-8, 3e-6, 1e-4, 0.01, 0.2, 0.4999, 0.5, 0.5001, 0.7, 1.0, 3.0, 10.0, 30.0)
    for sign in (1, -1)
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_kl_against_exact_arithmetic(dtype, device):
    # expm1(d) - d rounds only in the final subtraction: error ~eps * |d|. The textbook
    # exp(d) - 1 - d has error ~eps whatever d is, which near the prior is the whole answer.
    d = torch.tensor(LOG_RATIOS, dtype=dtype, device=device)
    exact = [_exact_variance_term(v) for v in d.double().tolist()]
    exact = 0.5 * torch.tensor(exact, dtype=torch.float64)
    ours = gaussian_kl(torch.zeros_like(d), d).double().cpu()
    eps = torch.finfo(dtype).eps
    d = d.double().cpu()
    assert ((ours - exact).abs() <= 16 * eps * exact + eps * d.abs()).all(), ours - exact
    naive = 0.5 * (torch.exp(d.to(dtype)) - 1 - d.to(dtype)).double()
    assert ((naive - exact).abs() > 10 * eps * d.abs()).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_gaussian_kl_is_nonnegative_in_every_dtype(dtype, device):
    g = torch.Generator().manual_seed(0)
    magnitude = torch.exp(torch.empty(200_000, dtype=torch.float64).uniform_(-60, 3.4, generator=g))
    sign = torch.randint(0, 2, (200_000,), generator=g) * 2 - 1
    d = torch.cat([(magnitude * sign).to(dtype), torch.zeros(3, dtype=dtype)]).to(device)
    kl = gaussian_kl(torch.zeros_like(d), d)
    assert kl.dtype == dtype
    assert (kl >= 0).all()
    assert torch.equal(kl[-3:], torch.zeros(3, dtype=dtype, device=device))


def test_gaussian_kl_is_nonnegative_in_float32_near_the_prior():
    # The naive exp(d) - 1 - d cancels catastrophically here and can come out negative.
    d = torch.cat([torch.linspace(-1e-2, 1e-2, 200_001), torch.logspace(-40, 1, 10_000)])
    d = torch.cat([d, -d]).float()
    kl = gaussian_kl(torch.zeros_like(d), d)
    assert (kl >= 0).all()
    naive = 0.5 * (torch.exp(d) - 1 - d)
    assert (naive < 0).any(), "the naive form should show the problem this guards against"


def test_gaussian_kl_overflow_is_inf_not_nan():
    kl = gaussian_kl(torch.zeros(2), torch.tensor([100.0, -1e4]))
    assert kl[0] == math.inf and kl[1] == pytest.approx(0.5 * (1e4 - 1))


def test_gaussian_kl_finite_with_finite_gradients_over_logvar_range():
    logvar = torch.linspace(-30, 30, 601, requires_grad=True)
    mu = torch.linspace(-5, 5, 601, requires_grad=True)
    kl = gaussian_kl(mu, logvar)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and (kl >= 0).all()
    assert torch.isfinite(logvar.grad).all() and torch.isfinite(mu.grad).all()
    # Analytic gradients: dKL/dmu = mu, dKL/dlogvar = (exp(logvar) - 1) / 2.
    torch.testing.assert_close(mu.grad, mu.detach())
    torch.testing.assert_close(logvar.grad, 0.5 * torch.expm1(logvar.detach()))


def test_gaussian_kl_analytic_gradients_general_prior():
    g = torch.Generator().manual_seed(7)
    mu, logvar, prior_mu, prior_logvar = (
        torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4)
    )
    grad_mu, grad_logvar = torch.autograd.grad(
        gaussian_kl(mu, logvar, prior_mu, prior_logvar).sum(), (mu, logvar)
    )
    with torch.no_grad():
        torch.testing.assert_close(grad_mu, (mu - prior_mu) * torch.exp(-prior_logvar))
        torch.testing.assert_close(grad_logvar, 0.5 * torch.expm1(logvar - prior_logvar))


def test_gaussian_kl_gradcheck_and_gradgradcheck():
    # Includes logvar = 0 (the prior), where the second derivative must be 1, not 0.
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    logvar = torch.tensor([-3.0, -0.2, 1e-3, 0.0, 0.4, 2.0], dtype=torch.float64)
    logvar.requires_grad_()
    assert torch.autograd.gradcheck(gaussian_kl, (mu, logvar))
    assert torch.autograd.gradgradcheck(gaussian_kl, (mu, logvar))
    at_prior = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    (gradient,) = torch.autograd.grad(
        gaussian_kl(torch.zeros_like(at_prior), at_prior).sum(), at_prior, create_graph=True
    )
    (second_derivative,) = torch.autograd.grad(gradient.sum(), at_prior)
    assert gradient.item() == 0 and second_derivative.item() == 0.5


def test_gaussian_kl_gradcheck_general_prior():
    g = torch.Generator().manual_seed(2)
    args = [
        torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4)
    ]
    assert torch.autograd.gradcheck(gaussian_kl, args)
    assert torch.autograd.gradgradcheck(gaussian_kl, args)


def test_gaussian_kl_standard_prior_equals_explicit_zero_prior():
    # prior None skips the prior's operations; the values and gradients must not change.
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(4, 1, 3, generator=g, dtype=torch.float64, requires_grad=True)
    logvar = (torch.randn(5, 3, generator=g, dtype=torch.float64) * 3).requires_grad_()
    default = gaussian_kl(mu, logvar)
    explicit = gaussian_kl(mu, logvar, prior_mu=0.0, prior_logvar=0.0)
    assert default.shape == (4, 5, 3)
    torch.testing.assert_close(default, explicit, rtol=1e-14, atol=1e-14)
    weights = torch.randn(4, 5, 3, generator=g, dtype=torch.float64)
    for a, b in zip(
        torch.autograd.grad((default * weights).sum(), (mu, logvar)),
        torch.autograd.grad((explicit * weights).sum(), (mu, logvar)),
        strict=True,
    ):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)


def test_gaussian_kl_works_under_vmap_and_per_example_grad():
    g = torch.Generator().manual_seed(2)
    mu, logvar = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)

    def kl(m, v):
        return gaussian_kl(m, v, validate=False)

    torch.testing.assert_close(torch.func.vmap(kl)(mu, logvar), kl(mu, logvar))
    per_example = torch.func.vmap(torch.func.grad(lambda m, v: kl(m, v).sum(), argnums=(0, 1)))
    grad_mu, grad_logvar = per_example(mu, logvar)
    torch.testing.assert_close(grad_mu, mu)
    torch.testing.assert_close(grad_logvar, 0.5 * torch.expm1(logvar))


def test_gaussian_kl_additive_over_independent_dims_equals_multivariate_diagonal():
    g = torch.Generator().manual_seed(3)
    mu, logvar = (
        torch.randn(10, 6, generator=g, dtype=torch.float64),
        torch.randn(10, 6, generator=g, dtype=torch.float64),
    )
    q = MultivariateNormal(mu, torch.diag_embed(logvar.exp()))
    p = MultivariateNormal(torch.zeros(6, dtype=torch.float64), torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(gaussian_kl(mu, logvar).sum(-1), kl_divergence(q, p))


def test_gaussian_kl_keeps_device_and_dtype_on_meta_device():
    mu = torch.empty(8, 4, device="meta", dtype=torch.float16)
    out = gaussian_kl(mu, mu, validate=False)
    assert out.device.type == "meta" and out.dtype == torch.float16 and out.shape == (8, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gaussian_kl_on_cuda_matches_cpu():
    mu, logvar = torch.randn(16, 8), torch.randn(16, 8)
    out = gaussian_kl(mu.cuda(), logvar.cuda())
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), gaussian_kl(mu, logvar))


# --------------------------------------------------------------------------------------------
# Full covariance
# --------------------------------------------------------------------------------------------


def _random_scale_tril(*shape, k, generator, dtype):
    a = torch.randn(*shape, k, k, generator=generator, dtype=dtype).tril(-1) * 0.5
    diag = torch.rand(*shape, k, generator=generator, dtype=dtype) + 0.3
    return a + torch.diag_embed(diag)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_gaussian_kl_matches_multivariate_normal(dtype):
    g = torch.Generator().manual_seed(4)
    k = 5
    mu_q = torch.randn(7, k, generator=g, dtype=dtype)
    mu_p = torch.randn(k, generator=g, dtype=dtype)  # one prior for the whole batch
    lq = _random_scale_tril(7, k=k, generator=g, dtype=dtype)
    lp = _random_scale_tril(k=k, generator=g, dtype=dtype)
    ours = full_gaussian_kl(mu_q, lq, mu_p, lp)
    oracle = kl_divergence(
        MultivariateNormal(mu_q.double(), scale_tril=lq.double()),
        MultivariateNormal(mu_p.double(), scale_tril=lp.double()),
    )
    assert ours.shape == (7,) and ours.dtype == dtype
    tol = {torch.float32: 1e-4, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(ours.double(), oracle, rtol=tol, atol=tol)


def test_full_gaussian_kl_reduces_to_diagonal_and_is_zero_at_equality():
    g = torch.Generator().manual_seed(5)
    mu, logvar = (
        torch.randn(4, 3, generator=g, dtype=torch.float64),
        torch.randn(4, 3, generator=g, dtype=torch.float64),
    )
    scale = torch.diag_embed((0.5 * logvar).exp())
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(
        full_gaussian_kl(mu, scale, torch.zeros(3, dtype=torch.float64), eye),
        gaussian_kl(mu, logvar).sum(-1),
    )
    lq = _random_scale_tril(4, k=3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        full_gaussian_kl(mu, lq, mu, lq), torch.zeros(4, dtype=torch.float64)
    )


def test_full_gaussian_kl_ignores_upper_triangle_and_rejects_bad_factors():
    eye = torch.eye(2)
    junk_upper = eye + torch.tensor([[0.0, 9.0], [0.0, 0.0]])
    assert full_gaussian_kl(torch.zeros(2), junk_upper, torch.zeros(2), eye).item() == 0.0
    with pytest.raises(ValueError, match="'scale_tril_p'.*diagonal"):
        full_gaussian_kl(torch.zeros(2), eye, torch.zeros(2), -eye)
    with pytest.raises(ValueError, match="'scale_tril_q'.*shape"):
        full_gaussian_kl(torch.zeros(3), eye, torch.zeros(3), torch.eye(3))


# --------------------------------------------------------------------------------------------
# Monte Carlo
# --------------------------------------------------------------------------------------------


def test_mc_kl_agrees_with_closed_form_within_standard_errors():
    g = torch.Generator().manual_seed(6)
    batch, dims, samples = 8, 4, 4000
    mu = torch.randn(batch, dims, generator=g, dtype=torch.float64)
    logvar = torch.randn(batch, dims, generator=g, dtype=torch.float64) * 0.5
    q = Normal(mu, (0.5 * logvar).exp())
    p = Normal(torch.zeros(()), torch.ones(()))
    z = mu + (0.5 * logvar).exp() * torch.randn(
        samples, batch, dims, generator=g, dtype=torch.float64
    )
    est = mc_kl(q.log_prob(z).sum(-1), p.log_prob(z).sum(-1), dim=0)
    exact = gaussian_kl(mu, logvar).sum(-1)
    assert est.estimate.shape == est.standard_error.shape == (batch,)
    z_scores = (est.estimate - exact) / est.standard_error
    assert z_scores.abs().max() < 5, z_scores
    # The standard error really is std/sqrt(S): a quarter of the samples doubles it.
    small = mc_kl(q.log_prob(z[:1000]).sum(-1), p.log_prob(z[:1000]).sum(-1))
    ratio = (small.standard_error / est.standard_error).mean()
    assert 1.7 < ratio < 2.3


def test_mc_kl_is_exact_when_q_equals_p_and_needs_two_samples():
    log_q = torch.randn(10, 3)
    est = mc_kl(log_q, log_q)
    assert torch.equal(est.estimate, torch.zeros(3)) and torch.equal(
        est.standard_error, torch.zeros(3)
    )
    with pytest.raises(ValueError, match="at least 2 samples"):
        mc_kl(torch.zeros(1, 3), torch.zeros(1, 3))
    assert math.isclose(float(mc_kl(torch.tensor([1.0, 3.0]), torch.zeros(2)).estimate), 2.0)
