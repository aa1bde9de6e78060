"""e^x - 1 - x (the Gaussian KL's variance term): both evaluations against exact arithmetic."""

import math
from fractions import Fraction

import pytest
import torch

from vae.losses import gaussian_kl, numerics
from vae.losses.numerics import (
    expm1_minus_x,
    expm1_minus_x_intrinsic,
    expm1_minus_x_series,
    standard_normal_kl,
)

EVALUATIONS = [expm1_minus_x_series, expm1_minus_x_intrinsic]


def _exact(x: float) -> float:
    """e^x - 1 - x with no rounding until the end (exact rational Taylor sum for |x| <= 1)."""
    if abs(x) > 1:
        return math.expm1(x) - x  # no cancellation out here: relative error ~1e-16
    q, term, total = Fraction(x), Fraction(x), Fraction(0)
    for k in range(2, 40):
        term = term * q / k
        total += term
    return float(total)


POINTS = [
    sign * m
    for m in (1e-30, 1e-8, 3e-6, 1e-4, 0.01, 0.2, 0.4999, 0.5, 0.5001, 0.7, 1.0, 3.0, 10.0, 30.0)
    for sign in (1, -1)
]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("evaluate", EVALUATIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_against_exact_arithmetic(evaluate, dtype, device):
    x = torch.tensor(POINTS, dtype=dtype, device=device)
    exact = torch.tensor([_exact(v) for v in x.double().tolist()], dtype=torch.float64)
    got = evaluate(x).double().cpu()
    x = x.cpu()
    eps = torch.finfo(dtype).eps
    if evaluate is expm1_minus_x_series:
        # Relative accuracy everywhere, including the tiny values near 0.
        bound = 16 * eps * exact + torch.finfo(dtype).tiny
    else:
        # expm1(x) - x: only the last subtraction rounds, error ~eps * |x|.
        bound = 16 * eps * exact + 2 * eps * x.double().abs()
    assert ((got - exact).abs() <= bound).all(), (got - exact).abs() / exact


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("evaluate", EVALUATIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_nonnegative_and_exactly_zero_at_zero(evaluate, dtype, device):
    g = torch.Generator().manual_seed(0)
    magnitude = torch.exp(torch.empty(200_000, dtype=torch.float64).uniform_(-60, 3.4, generator=g))
    sign = torch.randint(0, 2, (200_000,), generator=g) * 2 - 1
    x = torch.cat([(magnitude * sign).to(dtype), torch.zeros(3, dtype=dtype)]).to(device)
    y = evaluate(x)
    assert y.dtype == dtype
    assert (y >= 0).all()
    assert torch.equal(y[-3:], torch.zeros(3, dtype=dtype, device=device))


def test_series_is_exact_for_non_contiguous_input():
    x = torch.linspace(-1, 1, 4001).reshape(4001, 1).expand(4001, 3).t()  # strided view
    torch.testing.assert_close(
        expm1_minus_x_series(x), expm1_minus_x_series(x.contiguous()), rtol=0, atol=0
    )
    assert (expm1_minus_x_series(x) >= 0).all()


def test_overflow_is_inf_not_nan():
    x = torch.tensor([100.0, -1e4])
    for evaluate in EVALUATIONS:
        y = evaluate(x)
        assert y[0] == math.inf and y[1] == pytest.approx(1e4 - 1)


@pytest.fixture(params=["intrinsic", "series"])
def path(request, monkeypatch):
    """Run a test through each dispatch path of expm1_minus_x, whatever the tensor size."""
    threshold = 0 if request.param == "series" else 1 << 62
    monkeypatch.setattr(numerics, "_SERIES_MIN_NUMEL", threshold)
    return request.param


def test_dispatch_uses_the_series_for_large_cpu_tensors():
    small, large = torch.randn(8), torch.randn(1 << 14)
    assert torch.equal(expm1_minus_x(large), expm1_minus_x_series(large))
    assert torch.equal(expm1_minus_x(small), expm1_minus_x_intrinsic(small))
    assert not torch.equal(expm1_minus_x_series(large), expm1_minus_x_intrinsic(large))


def test_gradient_and_double_backward_are_exact(path):
    x = torch.tensor([-3.0, -0.2, 1e-3, 0.0, 0.4, 2.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(expm1_minus_x, (x,))
    assert torch.autograd.gradgradcheck(expm1_minus_x, (x,))


def test_gradient_is_finite_over_the_logvar_range(path):
    x = torch.linspace(-30, 30, 1001, requires_grad=True)
    y = expm1_minus_x(x)
    assert torch.isfinite(y).all() and (y >= 0).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad, torch.expm1(x.detach()))


def test_works_under_vmap(path):
    x = torch.randn(4, 5)
    torch.testing.assert_close(torch.func.vmap(expm1_minus_x)(x), expm1_minus_x(x))


# --------------------------------------------------------------------------------------------
# The N(0, 1) hot path (fused node on large CPU tensors) against the general-prior path
# --------------------------------------------------------------------------------------------


def test_fused_standard_normal_kl_matches_composed_path_values_and_gradients(path):
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(4, 1, 3, generator=g, dtype=torch.float64, requires_grad=True)
    logvar = (torch.randn(5, 3, generator=g, dtype=torch.float64) * 3).requires_grad_()
    fused = gaussian_kl(mu, logvar)  # no prior given: the N(0, 1) hot path
    composed = gaussian_kl(mu, logvar, prior_mu=0.0, prior_logvar=0.0)  # the general path
    node = type(fused.grad_fn).__name__
    assert ("StandardNormalKLSeries" in node) == (path == "series"), node
    assert fused.shape == (4, 5, 3)
    torch.testing.assert_close(fused, composed, rtol=1e-14, atol=1e-14)
    weights = torch.randn(4, 5, 3, generator=g, dtype=torch.float64)
    grads_fused = torch.autograd.grad((fused * weights).sum(), (mu, logvar))
    grads_composed = torch.autograd.grad((composed * weights).sum(), (mu, logvar))
    for a, b in zip(grads_fused, grads_composed, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)


def test_fused_standard_normal_kl_gradcheck_gradgradcheck_and_vmap(path):
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(standard_normal_kl, (mu, logvar))
    assert torch.autograd.gradgradcheck(standard_normal_kl, (mu, logvar))
    batched = torch.func.vmap(standard_normal_kl)(mu.detach(), logvar.detach())
    torch.testing.assert_close(batched, standard_normal_kl(mu, logvar).detach())
    # Per-example gradients through torch.func, as used for per-sample-gradient methods.
    per_example = torch.func.vmap(torch.func.grad(lambda m, v: standard_normal_kl(m, v).sum()))(
        mu.detach(), logvar.detach()
    )
    torch.testing.assert_close(per_example, mu.detach())
