"""Discretised likelihoods (vae.losses.discretized) against independent computations.

Oracles: the float64 CDF difference per bin from torch.distributions (where it does not
cancel), and 60-digit mpmath for every regime (tails, peaked and very wide scales), each with
the edge bins reaching to -inf / +inf as in PixelCNN++.
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from torch.distributions import Normal, TransformedDistribution, Uniform
from torch.distributions.transforms import AffineTransform, SigmoidTransform

from vae.losses import (
    PixelLikelihood,
    bits_per_dim,
    discretized_bin_log_probs,
    discretized_gaussian_nll,
    discretized_logistic_mixture_nll,
    discretized_logistic_nll,
    discretized_mean,
    discretized_sample,
)

mpmath.mp.dps = 60
SPREAD = {"discretized_logistic": "log_scale", "discretized_gaussian": "logvar"}
NLL = {
    "discretized_logistic": discretized_logistic_nll,
    "discretized_gaussian": discretized_gaussian_nll,
}


def _spread(name: str, log_scale):
    """The spread keyword of ``name`` for a scale s = exp(log_scale)."""
    return {"log_scale": log_scale} if name == "discretized_logistic" else {"logvar": 2 * log_scale}


def _bounds(levels: int, dtype=torch.float64):
    k = torch.arange(levels, dtype=dtype)
    half = 0.5 / (levels - 1)
    lower = torch.where(k == 0, torch.tensor(-math.inf, dtype=dtype), k / (levels - 1) - half)
    upper = torch.where(
        k == levels - 1, torch.tensor(math.inf, dtype=dtype), k / (levels - 1) + half
    )
    return lower, upper


def _torch_distribution(name: str, loc: torch.Tensor, scale: torch.Tensor):
    if name == "discretized_gaussian":
        return Normal(loc, scale)
    # The logistic as torch.distributions builds it: loc + scale * logit(U).
    return TransformedDistribution(
        Uniform(torch.zeros_like(loc), torch.ones_like(loc)),
        [SigmoidTransform().inv, AffineTransform(loc, scale)],
    )


def _mp_log_mass(name: str, loc: float, scale: float, k: int, levels: int) -> float:
    """log P(k) to 60 digits; the bin is reflected into the tail where its CDF is small."""
    loc, scale = mpmath.mpf(loc), mpmath.mpf(scale)
    x, half = mpmath.mpf(k) / (levels - 1), mpmath.mpf(1) / (2 * (levels - 1))

    def cdf(y):
        z = (y - loc) / scale
        return 1 / (1 + mpmath.exp(-z)) if name == "discretized_logistic" else mpmath.ncdf(z)

    if x <= loc:
        low = 0 if k == 0 else cdf(x - half)
        high = 1 if k == levels - 1 else cdf(x + half)
        return float(mpmath.log(high - low))
    survival = lambda y: cdf(2 * loc - y)  # noqa: E731  P(Y > y), by the distribution's symmetry
    low = 1 if k == 0 else survival(x - half)
    high = 0 if k == levels - 1 else survival(x + half)
    return float(mpmath.log(low - high))


# --- against the float64 CDF difference --------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SPREAD))
@pytest.mark.parametrize("levels", [2, 17, 256])
def test_bin_log_probs_match_the_cdf_difference_of_torch_distributions(name, levels):
    g = torch.Generator().manual_seed(levels)
    loc = torch.rand(5, 3, generator=g, dtype=torch.float64) * 1.2 - 0.1
    log_scale = torch.rand(5, 3, generator=g, dtype=torch.float64) * 3 - 3.5  # s in [0.01, 0.6]
    lower, upper = _bounds(levels)
    dist = _torch_distribution(name, loc.unsqueeze(-1), log_scale.exp().unsqueeze(-1))
    oracle = (dist.cdf(upper.clamp(max=1e6)) - dist.cdf(lower.clamp(min=-1e6))).log()
    ours = discretized_bin_log_probs(name, loc, levels=levels, **_spread(name, log_scale))
    assert ours.shape == (5, 3, levels) and ours.dtype == torch.float64
    # Only where float64 holds the difference to 1e-9 of itself (no cancellation).
    reliable = oracle > -15
    assert reliable.float().mean() > 0.3
    torch.testing.assert_close(ours[reliable], oracle[reliable], rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", sorted(SPREAD))
@pytest.mark.parametrize("log_scale", [-30.0, -12.0, -6.0, -3.0, 0.0, 5.0, 30.0, 80.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_bin_matches_60_digit_arithmetic_from_tiny_to_huge_scales(name, log_scale, dtype):
    levels = 256
    loc = torch.tensor([0.3137, -0.2, 1.0], dtype=dtype)
    spread = _spread(name, torch.full((3,), log_scale, dtype=dtype))
    ours = discretized_bin_log_probs(name, loc, levels=levels, **spread).double()
    scale = math.exp(log_scale)
    oracle = torch.tensor(
        [[_mp_log_mass(name, float(m), scale, k, levels) for k in range(levels)] for m in loc],
        dtype=torch.float64,
    )
    assert torch.isfinite(ours).all()
    # The rounding of a bin edge (x +- delta - loc, relative error eps) is amplified near a
    # peaked location, to ~3e-5 relative in float32: the inputs' own conditioning.
    rtol = 1e-11 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(ours, oracle, rtol=rtol, atol=rtol)


# --- a distribution over the L levels ---------------------------------------------------------


def _mixture_params(batch: int, components: int, event: tuple[int, ...], seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, components, *event, generator=g) * 2
    loc = torch.rand(batch, components, *event, generator=g) * 1.4 - 0.2
    log_scale = torch.rand(batch, components, *event, generator=g) * 4 - 6
    return torch.cat([logits, loc, log_scale], dim=1).double()


@pytest.mark.parametrize("levels", [17, 256])
@pytest.mark.parametrize("name", [*sorted(SPREAD), "discretized_logistic_mixture"])
def test_the_probabilities_of_all_bins_of_a_pixel_sum_to_one(name, levels):
    g = torch.Generator().manual_seed(0)
    if name == "discretized_logistic_mixture":
        prediction, spread = _mixture_params(4, 5, (2, 3), seed=1), {}
    else:
        prediction = torch.rand(4, 2, 3, generator=g, dtype=torch.float64) * 1.4 - 0.2
        spread = _spread(name, torch.rand(4, 2, 3, generator=g, dtype=torch.float64) * 10 - 8)
    table = discretized_bin_log_probs(name, prediction, levels=levels, **spread)
    assert table.shape == (4, 2, 3, levels)
    total = table.logsumexp(-1)
    torch.testing.assert_close(total, torch.zeros_like(total), rtol=0, atol=1e-12)
    spread32 = {k: v.float() for k, v in spread.items()}
    table32 = discretized_bin_log_probs(name, prediction.float(), levels=levels, **spread32)
    torch.testing.assert_close(table32.exp().sum(-1), torch.ones(4, 2, 3), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", [*sorted(SPREAD), "discretized_logistic_mixture"])
def test_the_nll_is_minus_the_tables_entry_at_each_target_summed(name):
    levels, g = 17, torch.Generator().manual_seed(2)
    target = torch.randint(0, levels, (4, 2, 3), generator=g).double() / (levels - 1)
    if name == "discretized_logistic_mixture":
        prediction, spread = _mixture_params(4, 3, (2, 3), seed=3), {}
        nll = discretized_logistic_mixture_nll(prediction, target, levels=levels)
    else:
        prediction = torch.rand(4, 2, 3, generator=g, dtype=torch.float64)
        spread = _spread(name, torch.full((4, 2, 3), -2.0, dtype=torch.float64))
        nll = NLL[name](prediction, target, levels=levels, **spread)
    table = discretized_bin_log_probs(name, prediction, levels=levels, **spread)
    index = torch.round(target * (levels - 1)).long().unsqueeze(-1)
    expected = -table.gather(-1, index).squeeze(-1).sum((1, 2))
    torch.testing.assert_close(nll, expected, rtol=1e-14, atol=1e-12)
    torch.testing.assert_close(
        NLL.get(name, discretized_logistic_mixture_nll)(
            prediction, target, levels=levels, unit="bits", **spread
        )
        * math.log(2),
        nll,
    )


def test_a_mixture_is_the_weighted_sum_of_its_components_masses():
    levels = 256
    params = _mixture_params(1, 3, (1,), seed=4)
    logits, loc, log_scale = params.chunk(3, dim=1)
    weights = logits.softmax(1)
    components = discretized_bin_log_probs(
        "discretized_logistic", loc, levels=levels, log_scale=log_scale
    ).exp()  # (1, 3, 1, L)
    mixture = discretized_bin_log_probs("discretized_logistic_mixture", params, levels=levels)
    torch.testing.assert_close(mixture.exp(), (weights.unsqueeze(-1) * components).sum(1))


def test_a_uniform_model_costs_exactly_8_bits_per_dim_on_8_bit_pixels():
    # An exactly uniform pmf over 256 levels: one mixture component per level, equal weights,
    # each so peaked (s = e^-40) that its level's bin holds all of its mass to the last bit.
    levels, channels, height, width = 256, 1, 4, 7
    likelihood = PixelLikelihood(
        "discretized_logistic_mixture",
        num_dims=channels * height * width,
        channels=channels,
        data_levels=levels,
        num_mixtures=levels,
    )
    centres = torch.arange(levels, dtype=torch.float64) / (levels - 1)
    per_parameter = [torch.zeros(levels), centres, torch.full((levels,), -40.0)]
    params = torch.cat(per_parameter).double().reshape(1, 3 * levels, 1, 1, 1)
    params = params.expand(3, -1, channels, height, width).reshape(3, -1, height, width)
    target = torch.randint(0, levels, (3, channels, height, width)).double() / (levels - 1)
    nll = likelihood(params, target)
    assert likelihood.reports_bits_per_dim
    torch.testing.assert_close(
        likelihood.bits_per_dim(nll), torch.full((3,), 8.0, dtype=torch.float64), rtol=0, atol=1e-12
    )
    assert bits_per_dim(nll, channels * height * width) is not None  # no offset: a pmf


# --- the edges and the extremes ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SPREAD))
def test_the_edge_bins_reach_to_infinity(name):
    levels = 256
    loc = torch.tensor([[-3.0, 4.0, 0.0, 1.0]], dtype=torch.float64)
    spread = _spread(name, torch.full((1, 4), -1.0, dtype=torch.float64))
    # A location far below 0 (above 1) puts nearly all mass in level 0 (level L-1).
    target = torch.tensor([[0.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    per_pixel = -discretized_bin_log_probs(name, loc, levels=levels, **spread)
    per_pixel = per_pixel.gather(-1, (target * 255).long().unsqueeze(-1)).squeeze(-1)
    dist = _torch_distribution(name, loc, spread_scale := math.exp(-1.0))
    half = 0.5 / (levels - 1)
    expected = torch.stack(
        [
            -dist.cdf(torch.tensor(half, dtype=torch.float64)).log()[0, 0],
            -(1 - dist.cdf(torch.tensor(1 - half, dtype=torch.float64))).log()[0, 1],
            -dist.cdf(torch.tensor(half, dtype=torch.float64)).log()[0, 2],
            -(1 - dist.cdf(torch.tensor(1 - half, dtype=torch.float64))).log()[0, 3],
        ]
    )
    assert spread_scale > 0
    torch.testing.assert_close(per_pixel[0], expected, rtol=1e-12, atol=1e-12)
    assert per_pixel[0, 0] < 1e-2 and per_pixel[0, 1] < 1e-2  # the edge holds the tail


@pytest.mark.parametrize("name", sorted(SPREAD))
@pytest.mark.parametrize("log_scale", [-40.0, 40.0])
def test_extreme_scales_give_finite_values_and_gradients(name, log_scale):
    levels = 256
    loc = torch.tensor([[0.0, 0.3, 1.0, 0.5, 1.3, -0.2]], requires_grad=True)
    spread = torch.full((1, 6), log_scale, requires_grad=True)
    target = torch.tensor([[0.0, 1.0, 1.0, 128 / 255, 0.0, 1.0]])
    keyword = SPREAD[name]
    nll = NLL[name](
        loc, target, levels=levels, **{keyword: spread if keyword == "log_scale" else 2 * spread}
    )
    nll.sum().backward()
    assert torch.isfinite(nll).all() and torch.isfinite(loc.grad).all()
    assert torch.isfinite(spread.grad).all()
    if log_scale > 0:
        # A scale of e^40: every bin has mass ~ density at the centre times the bin width.
        width = 1 / (levels - 1)
        density = (
            1 / (4 * math.exp(log_scale))
            if name == "discretized_logistic"
            else 1 / (math.sqrt(2 * math.pi) * math.exp(log_scale))
        )
        interior = -math.log(density * width)  # the one target inside, 128 / 255
        edges = math.log(2)  # the other five: half the mass on each side of the data range
        assert nll.item() == pytest.approx(interior + 5 * edges, rel=1e-6)


def test_the_gaussian_switches_to_the_midpoint_rule_only_where_it_is_as_accurate():
    # A sweep of sigma across the switch between the exact CDF difference and the density at
    # the bin centre: every bin within float32's rounding of 60-digit arithmetic.
    levels, name = 256, "discretized_gaussian"
    for log_sigma in torch.linspace(-1.0, 6.0, 15).tolist():
        loc = torch.tensor([0.42])
        ours = discretized_bin_log_probs(
            name, loc, levels=levels, logvar=torch.tensor([2 * log_sigma])
        )[0]
        for k in (1, 60, 107, 108, 200, 254):
            oracle = _mp_log_mass(name, float(loc), math.exp(log_sigma), k, levels)
            assert ours[k].item() == pytest.approx(oracle, rel=2e-6), (log_sigma, k)


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", [*sorted(SPREAD), "discretized_logistic_mixture"])
def test_half_precision_inputs_give_the_float32_answer(name, low):
    # A decoder under autocast gives bf16/fp16 parameters; the targets stay the data's float32
    # (bf16 cannot hold k / 255).
    levels, g = 256, torch.Generator().manual_seed(5)
    target = torch.randint(0, levels, (4, 1, 3, 3), generator=g).float() / (levels - 1)
    if name == "discretized_logistic_mixture":
        prediction = _mixture_params(4, 2, (1, 3, 3), seed=6).to(low)
        nll_low = discretized_logistic_mixture_nll(prediction, target, levels=levels)
        nll_32 = discretized_logistic_mixture_nll(prediction.float(), target, levels=levels)
    else:
        prediction = torch.rand(4, 1, 3, 3, generator=g).to(low)
        spread = {SPREAD[name]: torch.full((4, 1, 3, 3), -4.0).to(low)}
        nll_low = NLL[name](prediction, target, levels=levels, **spread)
        spread32 = {k: v.float() for k, v in spread.items()}
        nll_32 = NLL[name](prediction.float(), target, levels=levels, **spread32)
    assert nll_low.dtype == torch.float32
    assert torch.equal(nll_low, nll_32)


# --- display: mean and sample -----------------------------------------------------------------


@pytest.mark.parametrize("name", [*sorted(SPREAD), "discretized_logistic_mixture"])
def test_the_mean_is_within_half_a_level_of_the_tables_mean(name):
    levels, g = 17, torch.Generator().manual_seed(7)
    if name == "discretized_logistic_mixture":
        prediction, spread = _mixture_params(3, 4, (5,), seed=8), {}
    else:
        prediction = torch.rand(3, 5, generator=g, dtype=torch.float64) * 1.6 - 0.3
        spread = _spread(name, torch.rand(3, 5, generator=g, dtype=torch.float64) * 6 - 5)
    table = discretized_bin_log_probs(name, prediction, levels=levels, **spread).exp()
    exact = (table * torch.arange(levels) / (levels - 1)).sum(-1)
    mean = discretized_mean(name, prediction, levels=levels, **spread)
    assert mean.shape == exact.shape
    assert ((mean - exact).abs() <= 0.5 / (levels - 1)).all()
    assert ((mean >= 0) & (mean <= 1)).all()


@pytest.mark.parametrize("name", [*sorted(SPREAD), "discretized_logistic_mixture"])
def test_samples_lie_on_the_grid_with_the_tables_frequencies(name):
    levels, draws = 17, 40_000
    if name == "discretized_logistic_mixture":
        prediction = torch.tensor([[2.0, -1.0, 0.1, 0.7, -2.5, -1.5]]).double()  # K = 2
        prediction, spread = prediction.reshape(1, 6, 1).expand(draws, 6, 1), {}
    else:
        prediction = torch.full((draws, 1), 0.55, dtype=torch.float64)
        spread = _spread(name, torch.full((draws, 1), -1.8, dtype=torch.float64))
    sample = discretized_sample(
        name, prediction, levels=levels, generator=torch.Generator().manual_seed(9), **spread
    )
    levels_drawn = sample * (levels - 1)
    assert torch.equal(levels_drawn, levels_drawn.round())
    frequencies = torch.bincount(levels_drawn.long().flatten(), minlength=levels) / draws
    table = (
        discretized_bin_log_probs(
            name, prediction[:1], levels=levels, **{k: v[:1] for k, v in spread.items()}
        )
        .exp()
        .flatten()
    )
    # Each frequency within 5 standard errors of its probability.
    standard_error = (table * (1 - table) / draws).sqrt()
    assert ((frequencies - table).abs() <= 5 * standard_error + 1e-12).all()


# --- bad input --------------------------------------------------------------------------------


def test_bad_inputs_are_value_errors_naming_the_argument():
    loc, target = torch.full((2, 3), 0.5), torch.full((2, 3), 8 / 16)
    call = discretized_logistic_nll
    with pytest.raises(ValueError, match=r"argument 'target' is not on the grid k / 16"):
        call(loc, torch.full((2, 3), 0.51), log_scale=0.0, levels=17)
    with pytest.raises(ValueError, match=r"argument 'target' has values outside \[0, 1\]"):
        call(loc, torch.full((2, 3), 2.0), log_scale=0.0, levels=17)
    for levels in (1, 0, 2.0, True, None):
        with pytest.raises(ValueError, match=r"argument 'levels' must be an int >= 2"):
            call(loc, target, log_scale=0.0, levels=levels)
    with pytest.raises(ValueError, match=r"argument 'loc' contains 2 NaN"):
        call(torch.tensor([[0.5, math.nan, 0.5]] * 2), target, log_scale=0.0, levels=17)
    with pytest.raises(ValueError, match=r"argument 'log_scale' contains"):
        call(loc, target, log_scale=torch.tensor(math.inf), levels=17)
    with pytest.raises(ValueError, match=r"argument 'target' contains 2 NaN"):
        call(loc, torch.tensor([[0.5, math.nan, 0.5]] * 2), log_scale=0.0, levels=17)
    with pytest.raises(ValueError, match=r"must broadcast to the target's shape"):
        call(torch.zeros(3, 2, 3), target, log_scale=0.0, levels=17)
    with pytest.raises(ValueError, match=r"argument 'target' is an empty batch"):
        discretized_gaussian_nll(torch.zeros(0, 3), torch.zeros(0, 3), logvar=0.0, levels=17)
    with pytest.raises(ValueError, match=r"argument 'params' must have shape \(B, 3K, \.\.\.\)"):
        discretized_logistic_mixture_nll(torch.zeros(2, 4, 3), target, levels=17)
    with pytest.raises(ValueError, match=r"argument 'params' \(2, 6, 4\) must have shape"):
        discretized_logistic_mixture_nll(torch.zeros(2, 6, 4), target, levels=17)
    with pytest.raises(ValueError, match=r"argument 'name' must be one of"):
        discretized_mean("logistic", loc, levels=17, log_scale=0.0)
    with pytest.raises(ValueError, match=r"discretized_gaussian takes the spread 'logvar' only"):
        discretized_mean("discretized_gaussian", loc, levels=17, log_scale=0.0)
    with pytest.raises(TypeError):
        call(loc, target, 0.0, levels=17)  # the spread is keyword-only


def test_off_grid_targets_are_rounded_without_validation():
    # validate=False skips the value checks (the hot path); levels are still read by rounding.
    loc, on = torch.full((1, 2), 0.5), torch.tensor([[0.5, 0.75]])
    off = on + 1e-4
    torch.testing.assert_close(
        discretized_logistic_nll(loc, off, log_scale=-2.0, levels=5, validate=False),
        discretized_logistic_nll(loc, on, log_scale=-2.0, levels=5),
    )
