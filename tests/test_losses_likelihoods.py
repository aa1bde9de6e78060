"""Reconstruction NLLs against torch.distributions log-probabilities (nats per example)."""

import math

import pytest
import torch
from torch.distributions import Bernoulli, Laplace, Normal

from vae.losses import (
    LIKELIHOODS,
    bernoulli_nll,
    bits_per_dim,
    gaussian_nll,
    get_likelihood,
    laplace_nll,
)


def _images(generator, dtype=torch.float64):
    return torch.rand(6, 3, 4, 5, generator=generator, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bernoulli_nll_matches_torch_distributions(dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, 4, 5, generator=g, dtype=dtype) * 5
    target = (_images(g, dtype) > 0.5).to(dtype)
    ours = bernoulli_nll(logits, target)
    oracle = -Bernoulli(logits=logits.double()).log_prob(target.double()).sum((1, 2, 3))
    assert ours.shape == (6,) and ours.dtype == dtype
    torch.testing.assert_close(ours.double(), oracle, rtol=1e-5, atol=1e-5)


def test_bernoulli_nll_is_stable_for_huge_logits():
    logits = torch.tensor([[1e4, -1e4, 1e4]])
    target = torch.tensor([[1.0, 0.0, 0.0]])
    torch.testing.assert_close(bernoulli_nll(logits, target), torch.tensor([1e4]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_nll_fixed_sigma_matches_normal(dtype):
    g = torch.Generator().manual_seed(1)
    mean, target = _images(g, dtype), _images(g, dtype)
    for logvar in (0.0, -4.0):  # sigma = 1 and sigma = e^-2
        oracle = (
            -Normal(mean.double(), math.exp(logvar / 2)).log_prob(target.double()).sum((1, 2, 3))
        )
        ours = gaussian_nll(mean, target, logvar=logvar)
        assert ours.dtype == dtype
        torch.testing.assert_close(ours.double(), oracle, rtol=1e-5, atol=1e-4)


def test_gaussian_nll_includes_the_normalising_constant():
    # Perfect reconstruction with sigma = 1 still costs 0.5 log(2 pi) nats per pixel.
    x = torch.zeros(2, 10)
    torch.testing.assert_close(
        gaussian_nll(x, x), torch.full((2,), 10 * 0.5 * math.log(2 * math.pi))
    )


def test_gaussian_nll_learned_variance_per_channel_and_gradient():
    g = torch.Generator().manual_seed(2)
    mean, target = _images(g), _images(g)
    logvar = torch.randn(3, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    ours = gaussian_nll(mean, target, logvar=logvar)
    oracle = -Normal(mean, (logvar / 2).exp()).log_prob(target).sum((1, 2, 3))
    torch.testing.assert_close(ours, oracle)
    ours.sum().backward()
    # d/d logvar of sum over pixels [logvar / 2 + r^2 / (2 e^logvar)] = sum (1 - r^2 / sigma^2) / 2.
    r2 = ((target - mean) ** 2 / logvar.detach().exp()).sum((0, 2, 3))
    expected = (6 * 4 * 5 - r2) / 2
    torch.testing.assert_close(logvar.grad.flatten(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_laplace_nll_matches_torch_distributions(dtype):
    g = torch.Generator().manual_seed(3)
    loc, target = _images(g, dtype), _images(g, dtype)
    log_scale = torch.randn(6, 1, 1, 1, generator=g, dtype=dtype)  # one scale per example
    ours = laplace_nll(loc, target, log_scale=log_scale)
    oracle = (
        -Laplace(loc.double(), log_scale.double().exp()).log_prob(target.double()).sum((1, 2, 3))
    )
    assert ours.shape == (6,) and ours.dtype == dtype
    torch.testing.assert_close(ours.double(), oracle, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        laplace_nll(target, target), torch.full((6,), 60 * math.log(2), dtype=dtype)
    )


def test_prediction_may_broadcast_to_target_but_not_the_reverse():
    target = torch.rand(4, 10)
    shared_mean = torch.full((10,), 0.5)
    assert gaussian_nll(shared_mean, target).shape == (4,)
    with pytest.raises(ValueError, match="gaussian_nll: .*'mean'.*target's shape"):
        gaussian_nll(torch.rand(4, 10), torch.rand(4, 1))
    with pytest.raises(ValueError, match="'logvar'"):
        gaussian_nll(target, target, logvar=torch.zeros(4, 10, 1))
    with pytest.raises(ValueError, match="'target' must have a batch dimension"):
        laplace_nll(torch.tensor(0.0), torch.tensor(0.0))


def test_registry_and_bits_per_dim():
    assert set(LIKELIHOODS) == {"bernoulli", "gaussian", "laplace"}
    assert get_likelihood("laplace") is laplace_nll
    with pytest.raises(
        ValueError, match="'name' must be one of \\['bernoulli', 'gaussian', 'laplace'\\]"
    ):
        get_likelihood("poisson")
    assert bits_per_dim(torch.tensor(784 * math.log(2)), 784).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="'num_dims'"):
        bits_per_dim(1.0, 0)


EMPTY_CALLS = {
    "bernoulli_nll": lambda prediction, target: bernoulli_nll(prediction, target),
    "gaussian_nll": lambda prediction, target: gaussian_nll(prediction, target, logvar=1.0),
    "laplace_nll": lambda prediction, target: laplace_nll(prediction, target),
}


@pytest.mark.parametrize("name", sorted(EMPTY_CALLS))
def test_an_empty_batch_is_a_value_error_naming_the_target(name):
    call = EMPTY_CALLS[name]
    with pytest.raises(
        ValueError,
        match=rf"{name}: argument 'target' is an empty batch \(shape \(0, 784\)\); "
        r"pass at least one example",
    ):
        call(torch.zeros(0, 784), torch.zeros(0, 784))
    with pytest.raises(ValueError, match=rf"{name}: argument 'target' is an empty batch"):
        call(torch.zeros(784), torch.zeros(0, 784))  # a shared prediction, still no examples


@pytest.mark.parametrize("name", sorted(EMPTY_CALLS))
def test_examples_without_elements_have_nll_zero(name):
    # -log of an empty product of likelihood terms: 0 nats for each of the 3 examples.
    nll = EMPTY_CALLS[name](torch.zeros(3, 0), torch.zeros(3, 0))
    assert nll.shape == (3,) and (nll == 0).all()
