"""Reconstruction NLLs against torch.distributions log-probabilities (nats per example)."""

import math

import pytest
import torch
from torch.distributions import Bernoulli, Laplace, Normal

from vae.losses import (
    DISCRETIZED_LIKELIHOODS,
    LIKELIHOODS,
    PixelLikelihood,
    bernoulli_nll,
    bits_per_dim,
    discretized_bin_log_probs,
    discretized_logistic_mixture_nll,
    discretized_logistic_nll,
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
    assert set(LIKELIHOODS) == {"bernoulli", "gaussian", "laplace", *DISCRETIZED_LIKELIHOODS}
    assert get_likelihood("laplace") is laplace_nll
    assert get_likelihood("discretized_logistic") is discretized_logistic_nll
    with pytest.raises(ValueError, match="'name' must be one of \\['bernoulli', 'discretized_"):
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


# --- PixelLikelihood with the discretised likelihoods ------------------------------------------


def _pixel_likelihood(name, channels=2, levels=17, **kwargs):
    return PixelLikelihood(
        name, num_dims=channels * 3 * 4, channels=channels, data_levels=levels, **kwargs
    )


def test_decoder_channels_per_image_channel():
    assert _pixel_likelihood("bernoulli").params_per_channel == 1
    assert _pixel_likelihood("gaussian").params_per_channel == 1
    assert _pixel_likelihood("discretized_logistic").params_per_channel == 2
    assert _pixel_likelihood("discretized_gaussian").params_per_channel == 2
    mixture = _pixel_likelihood("discretized_logistic_mixture", num_mixtures=4)
    assert mixture.params_per_channel == 12


@pytest.mark.parametrize("name", sorted(DISCRETIZED_LIKELIHOODS))
def test_parameter_major_layout_reaches_the_nll(name):
    # Decoder channel p * C + c is parameter p of image channel c.
    g = torch.Generator().manual_seed(0)
    likelihood = _pixel_likelihood(name, num_mixtures=3)
    p = likelihood.params_per_channel
    params = torch.randn(5, p * 2, 3, 4, generator=g, dtype=torch.float64)
    target = torch.randint(0, 17, (5, 2, 3, 4), generator=g).double() / 16
    packed = params.reshape(5, p, 2, 3, 4)
    if name == "discretized_logistic_mixture":
        expected = discretized_logistic_mixture_nll(packed, target, levels=17)
    else:
        keyword = "logvar" if name == "discretized_gaussian" else "log_scale"
        scale = 2 * packed[:, 1] if name == "discretized_gaussian" else packed[:, 1]
        table = discretized_bin_log_probs(name, packed[:, 0], levels=17, **{keyword: scale})
        index = (target * 16).round().long().unsqueeze(-1)
        expected = -table.gather(-1, index).sum((1, 2, 3, 4))
    torch.testing.assert_close(likelihood(params, target), expected)
    # A pmf of the data: bits/dim is a change of units, no dequantisation offset.
    assert likelihood.reports_bits_per_dim
    torch.testing.assert_close(
        likelihood.bits_per_dim(expected), expected / (24 * math.log(2)), rtol=1e-15, atol=0
    )
    mean, sample = likelihood.mean(params), likelihood.sample(params)
    assert mean.shape == sample.shape == target.shape
    assert torch.equal(sample * 16, (sample * 16).round())


@pytest.mark.parametrize("name", sorted(DISCRETIZED_LIKELIHOODS))
def test_params_for_mean_start_at_the_mean_image_with_a_broad_scale(name):
    likelihood = _pixel_likelihood(name, num_mixtures=3)
    mean_image = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(1))
    params = likelihood.params_for_mean(mean_image)
    assert params.shape == (likelihood.params_per_channel * 2, 3, 4)
    # The mean of the starting distribution is the mean image, up to the edge bins' clipping.
    start = likelihood.mean(params.unsqueeze(0))[0]
    assert (start - mean_image).abs().max() < 0.1


def test_discretised_likelihood_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"likelihood 'discretized_logistic' needs 'data_levels'"):
        PixelLikelihood("discretized_logistic", num_dims=4, data_levels=None)
    with pytest.raises(ValueError, match=r"argument 'learn_sigma' is for gaussian/laplace"):
        _pixel_likelihood("discretized_gaussian", learn_sigma=True)
    with pytest.raises(ValueError, match=r"argument 'num_mixtures' must be a positive int"):
        _pixel_likelihood("discretized_logistic_mixture", num_mixtures=0)
    with pytest.raises(ValueError, match=r"argument 'data_levels' must be an int >= 2"):
        _pixel_likelihood("discretized_logistic", levels=1)
    likelihood = _pixel_likelihood("discretized_logistic")
    target = torch.zeros(5, 2, 3, 4)
    # A decoder built for one parameter per channel (e.g. the VQ-VAE's) is refused.
    with pytest.raises(ValueError, match=r"needs 2 decoder output channel\(s\) per image channel"):
        likelihood(torch.zeros(5, 2, 3, 4), target)
    # Data of another depth: 8-bit targets on a 17-level likelihood.
    with pytest.raises(ValueError, match=r"argument 'target' is not on the grid k / 16"):
        likelihood(torch.zeros(5, 4, 3, 4), torch.full((5, 2, 3, 4), 1 / 255))
