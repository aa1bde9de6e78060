"""The three conventions of ``vae.losses`` (its package docstring), checked over ``__all__``.

1. Order: a divergence f(p, q) is D(p || q); a loss takes (prediction, target).
2. Spread: a Gaussian's is ``logvar`` everywhere, a Laplace's ``log_scale``, a full covariance
   ``scale_tril``; likelihood spreads are keyword-only.
3. Unit: every function returning an information quantity takes keyword-only
   ``unit="nats" | "bits"``; the objects you train with take none (nats).

Every public name is classified in ``CONVENTIONS``, so a new one fails
``test_every_public_name_is_classified`` until its author says which rules apply; the
signature rules then hold for it automatically. Old spellings: ``vae.losses.deprecation``.
"""

from __future__ import annotations

import inspect
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, MultivariateNormal, Normal, kl_divergence

import vae.losses as losses
from vae.losses import (
    KLDivergence,
    PixelLikelihood,
    bernoulli_nll,
    categorical_kl,
    categorical_kl_from_logits,
    cross_entropy,
    entropy,
    full_gaussian_kl,
    gaussian_kl,
    gaussian_nll,
    laplace_nll,
    mc_kl,
    uniform_prior_rate,
)

# name: (order, unit)
#   order: "divergence" (f(p, q) = D(p || q)), "loss" (f(prediction, target)), or None (one input,
#          or no pair of distributions);
#   unit:  True when it returns an information quantity and so takes unit= (functions only).
CONVENTIONS = {
    "gaussian_kl": ("divergence", True),
    "full_gaussian_kl": ("divergence", True),
    "categorical_kl": ("divergence", True),
    "categorical_kl_from_logits": ("divergence", True),
    "cross_entropy": ("divergence", True),
    "mc_kl": ("divergence", True),
    "entropy": (None, True),
    "MonteCarloKL": (None, False),  # the result type of mc_kl
    "KLDivergence": ("loss", False),  # a training objective: nats
    "kl_decomposition": (None, True),
    "KLDecomposition": (None, False),  # the result type of kl_decomposition
    "minibatch_log_densities": (None, False),  # log-densities, nats (a loss's building block)
    "bernoulli_nll": ("loss", True),
    "gaussian_nll": ("loss", True),
    "laplace_nll": ("loss", True),
    "PixelLikelihood": ("loss", False),  # the model's recon term: nats
    "discretized_logistic_nll": ("loss", True),
    "discretized_gaussian_nll": ("loss", True),
    "discretized_logistic_mixture_nll": ("loss", True),
    "discretized_bin_log_probs": (None, False),  # log-masses, nats (a table for inspection)
    "discretized_mean": (None, False),  # a pixel value
    "discretized_sample": (None, False),
    "DISCRETIZED_LIKELIHOODS": (None, False),
    "bits_per_dim": (None, False),  # bits by definition
    "uniform_dequantize": (None, False),
    "CONTINUOUS_LIKELIHOODS": (None, False),
    "LIKELIHOODS": (None, False),
    "get_likelihood": (None, False),
    "Schedule": (None, False),
    "ConstantBeta": (None, False),
    "LinearWarmup": (None, False),
    "CyclicalBeta": (None, False),
    "CapacitySchedule": (None, False),
    "ELBOTerms": (None, False),
    "KLRegulariser": (None, False),  # (kl, step): objectives, in the unit of kl (nats)
    "BetaKL": (None, False),
    "CapacityKL": (None, False),
    "FreeBitsKL": (None, False),
    "compute_elbo": (None, False),  # adds up the terms it is given
    "build_regulariser": (None, False),
    "kl_regulariser": (None, False),
    "REGULARISER_KINDS": (None, False),
    "set_validation": (None, False),
    "validation_enabled": (None, False),
    "validation": (None, False),
    "vq_losses": (None, False),  # (z, quantized): squared latent units, not information
    "codebook_loss": (None, False),
    "commitment_loss": (None, False),
    "perplexity": (None, False),  # exp(entropy): a number of codes, the same in any unit
    "codebook_usage": (None, False),
    "uniform_prior_rate": (None, True),
}


def _signatures(name: str) -> dict[str, inspect.Signature]:
    """The signatures a user calls for a public name: a function's own; a class's constructor
    and, for a module or a callable object, its forward / __call__."""
    obj = getattr(losses, name)
    if inspect.isfunction(obj):
        return {name: inspect.signature(obj)}
    if not inspect.isclass(obj):
        return {}
    found = {}
    for method in ("__init__", "forward", "__call__"):
        function = obj.__dict__.get(method)
        if function is None:
            continue
        parameters = list(inspect.signature(function).parameters.values())[1:]  # no self
        found[f"{name}.{method}"] = inspect.Signature(parameters)
    return found


ALL_SIGNATURES = {
    qualified: signature
    for name in losses.__all__
    for qualified, signature in _signatures(name).items()
}


def test_every_public_name_is_classified():
    assert sorted(CONVENTIONS) == sorted(losses.__all__), (
        "classify each new public name in CONVENTIONS: which of the three rules apply to it"
    )
    assert "KLDivergence.forward" in ALL_SIGNATURES and "PixelLikelihood.__init__" in ALL_SIGNATURES


# --------------------------------------------------------------------------------------------
# Rule 1: order
# --------------------------------------------------------------------------------------------

NORMAL_A = Normal(torch.tensor([0.3, -1.0], dtype=torch.float64), torch.tensor([0.5, 2.0]).double())
NORMAL_B = Normal(torch.tensor([-0.4, 0.2], dtype=torch.float64), torch.tensor([1.5, 0.3]).double())
_L = torch.tensor([[1.0, 0.0], [0.7, 0.4]], dtype=torch.float64)
MVN_A = MultivariateNormal(torch.tensor([0.3, -1.0], dtype=torch.float64), scale_tril=_L)
MVN_B = MultivariateNormal(
    torch.zeros(2, dtype=torch.float64),
    scale_tril=torch.tensor([[3.0, 0.0], [-1.0, 0.5]], dtype=torch.float64),
)
CAT_A = Categorical(probs=torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64))
CAT_B = Categorical(probs=torch.tensor([0.02, 0.08, 0.9], dtype=torch.float64))

# f(A, B), arguments in signature order, against torch.distributions' KL(A || B).
DIVERGENCE_CALLS = {
    "gaussian_kl": (
        NORMAL_A,
        NORMAL_B,
        lambda a, b: gaussian_kl(a.loc, 2 * a.scale.log(), b.loc, 2 * b.scale.log()),
    ),
    "full_gaussian_kl": (
        MVN_A,
        MVN_B,
        lambda a, b: full_gaussian_kl(a.loc, a.scale_tril, b.loc, b.scale_tril),
    ),
    "categorical_kl": (CAT_A, CAT_B, lambda a, b: categorical_kl(a.probs, b.probs)),
    "categorical_kl_from_logits": (
        CAT_A,
        CAT_B,
        lambda a, b: categorical_kl_from_logits(a.logits, b.logits),
    ),
    # H(a, b) - H(a) = KL(a || b): the first argument is the one the expectation is under.
    "cross_entropy": (
        CAT_A,
        CAT_B,
        lambda a, b: cross_entropy(a.probs, b.probs) - a.entropy(),
    ),
}


@pytest.mark.parametrize("name", sorted(n for n, c in CONVENTIONS.items() if c[0] == "divergence"))
def test_a_divergence_takes_the_left_distribution_first(name):
    if name == "mc_kl":
        # Samples from a: mc_kl(log a(z), log b(z)) estimates KL(a || b), not KL(b || a).
        noise = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(0)).double()
        z = NORMAL_A.loc + NORMAL_A.scale * noise
        estimate, error = mc_kl(NORMAL_A.log_prob(z).sum(-1), NORMAL_B.log_prob(z).sum(-1))
        forward = kl_divergence(NORMAL_A, NORMAL_B).sum()
        reverse = kl_divergence(NORMAL_B, NORMAL_A).sum()
        assert abs(estimate - forward) < 5 * error < 0.1 * abs(forward - reverse)
        return
    a, b, call = DIVERGENCE_CALLS[name]
    forward, reverse = kl_divergence(a, b).sum(), kl_divergence(b, a).sum()
    assert abs(forward - reverse) > 0.1  # the test distinguishes the two directions
    torch.testing.assert_close(call(a, b).sum(), forward)


def _parameters(signature: inspect.Signature) -> list[inspect.Parameter]:
    return list(signature.parameters.values())


@pytest.mark.parametrize("qualified", sorted(ALL_SIGNATURES))
def test_a_target_is_always_the_second_argument_of_a_loss(qualified):
    names = [p.name for p in _parameters(ALL_SIGNATURES[qualified])]
    if "target" not in names:
        return
    owner = qualified.split(".")[0]
    assert CONVENTIONS[owner][0] == "loss", f"{qualified} takes a 'target': classify it as a loss"
    assert names.index("target") == 1, (
        f"{qualified}{ALL_SIGNATURES[qualified]}: (prediction, target)"
    )


@pytest.mark.parametrize("name", sorted(n for n, c in CONVENTIONS.items() if c[0] == "loss"))
def test_every_loss_takes_prediction_then_target(name):
    qualified = f"{name}.forward" if inspect.isclass(getattr(losses, name)) else name
    parameters = _parameters(ALL_SIGNATURES[qualified])
    assert parameters[1].name == "target", f"{qualified}{ALL_SIGNATURES[qualified]}"


def test_kl_divergence_module_tensors_are_keyword_only_and_mean_kl_target_to_predicted():
    parameters = _parameters(ALL_SIGNATURES["KLDivergence.forward"])
    assert [(p.name, p.kind) for p in parameters] == [
        ("predicted", inspect.Parameter.KEYWORD_ONLY),
        ("target", inspect.Parameter.KEYWORD_ONLY),
    ]
    loss = KLDivergence("none")(predicted=CAT_B.probs, target=CAT_A.probs)
    torch.testing.assert_close(loss, kl_divergence(CAT_A, CAT_B))  # KL(target || predicted)
    # The direction of torch.nn.KLDivLoss(input=log predicted, target).
    torch.testing.assert_close(loss, F.kl_div(CAT_B.probs.log(), CAT_A.probs, reduction="sum"))


# --------------------------------------------------------------------------------------------
# Rule 2: spread
# --------------------------------------------------------------------------------------------

SPREAD = re.compile(r"sigma|std|var|scale|tril")
SPREAD_NAMES = {"logvar", "prior_logvar", "log_scale", "scale_tril_q", "scale_tril_p"}
# The one spread not in log space: a positive hyper-parameter typed into the config (model.sigma).
HYPER_PARAMETERS = {
    ("PixelLikelihood.__init__", "sigma"),
    ("PixelLikelihood.__init__", "learn_sigma"),
}


def test_spreads_have_one_name_per_parameterisation_across_the_api():
    spreads = {
        (qualified, p.name)
        for qualified, signature in ALL_SIGNATURES.items()
        for p in _parameters(signature)
        if SPREAD.search(p.name)
    }
    unexpected = {s for s in spreads - HYPER_PARAMETERS if s[1] not in SPREAD_NAMES}
    assert not unexpected, (
        f"{sorted(unexpected)}: a Gaussian's spread is 'logvar' (log sigma^2), a Laplace's "
        f"'log_scale', a full covariance 'scale_tril' (see vae.losses' docstring)"
    )
    assert {s for s in spreads if s[1] in {"logvar", "prior_logvar"}} == {
        ("gaussian_kl", "logvar"),
        ("gaussian_kl", "prior_logvar"),
        ("gaussian_nll", "logvar"),
        ("discretized_gaussian_nll", "logvar"),
        ("discretized_bin_log_probs", "logvar"),
        ("discretized_mean", "logvar"),
        ("discretized_sample", "logvar"),
        ("kl_decomposition", "logvar"),
        ("minibatch_log_densities", "logvar"),
    }


@pytest.mark.parametrize("name", sorted(n for n, c in CONVENTIONS.items() if c[0] == "loss"))
def test_a_likelihood_spread_is_keyword_only(name):
    for qualified, signature in _signatures(name).items():
        for p in _parameters(signature):
            if p.name in SPREAD_NAMES:
                assert p.kind is inspect.Parameter.KEYWORD_ONLY, f"{qualified}{signature}"


def test_one_logvar_means_one_gaussian_in_the_kl_and_in_the_likelihood():
    mean = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64)
    logvar = torch.tensor([[-1.0, 0.5, 2.0]], dtype=torch.float64)
    x = torch.tensor([[0.0, 1.0, -0.5]], dtype=torch.float64)
    gaussian = Normal(mean, (logvar / 2).exp())
    standard = Normal(torch.zeros_like(mean), torch.ones_like(mean))
    torch.testing.assert_close(gaussian_kl(mean, logvar), kl_divergence(gaussian, standard))
    torch.testing.assert_close(gaussian_nll(mean, x, logvar=logvar), -gaussian.log_prob(x).sum(-1))


# --------------------------------------------------------------------------------------------
# Rule 3: unit
# --------------------------------------------------------------------------------------------

_P, _Q = CAT_A.probs, CAT_B.probs
_X = torch.rand(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
_M = torch.rand(3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
_GRID = torch.round(_X * 16) / 16  # _X on the grid of 17 levels

UNIT_CALLS = {
    "gaussian_kl": lambda unit: gaussian_kl(_M, _X, unit=unit),
    "full_gaussian_kl": lambda unit: full_gaussian_kl(
        MVN_A.loc, MVN_A.scale_tril, MVN_B.loc, MVN_B.scale_tril, unit=unit
    ),
    "categorical_kl": lambda unit: categorical_kl(_P, _Q, unit=unit),
    "categorical_kl_from_logits": lambda unit: categorical_kl_from_logits(_P, _Q, unit=unit),
    "cross_entropy": lambda unit: cross_entropy(_P, _Q, unit=unit),
    "entropy": lambda unit: entropy(_P, unit=unit),
    "mc_kl": lambda unit: torch.stack(list(mc_kl(_M, _X, unit=unit))),
    "bernoulli_nll": lambda unit: bernoulli_nll(_M, _X, unit=unit),
    "gaussian_nll": lambda unit: gaussian_nll(_M, _X, logvar=-1.0, unit=unit),
    "laplace_nll": lambda unit: laplace_nll(_M, _X, log_scale=-1.0, unit=unit),
    "discretized_logistic_nll": lambda unit: losses.discretized_logistic_nll(
        _M, _GRID, log_scale=-1.0, levels=17, unit=unit
    ),
    "discretized_gaussian_nll": lambda unit: losses.discretized_gaussian_nll(
        _M, _GRID, logvar=-1.0, levels=17, unit=unit
    ),
    "discretized_logistic_mixture_nll": lambda unit: losses.discretized_logistic_mixture_nll(
        torch.cat([_M, _X, -_M]).reshape(3, 3, 4).transpose(0, 1), _GRID, levels=17, unit=unit
    ),
    "kl_decomposition": lambda unit: torch.stack(
        [
            torch.as_tensor(v).flatten()[0]
            for v in losses.kl_decomposition(
                _M, _X, generator=torch.Generator().manual_seed(0), unit=unit
            )
        ]
    ),
    "uniform_prior_rate": lambda unit: torch.tensor(
        uniform_prior_rate(7, 512, unit=unit), dtype=torch.float64
    ),
}


def test_the_unit_table_covers_every_information_function():
    assert sorted(UNIT_CALLS) == sorted(n for n, c in CONVENTIONS.items() if c[1])


@pytest.mark.parametrize("name", sorted(UNIT_CALLS))
def test_every_information_function_takes_unit_nats_or_bits(name):
    unit = inspect.signature(getattr(losses, name)).parameters.get("unit")
    assert unit is not None and unit.kind is inspect.Parameter.KEYWORD_ONLY, name
    assert unit.default == "nats"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the current spelling warns about nothing
        nats, bits = UNIT_CALLS[name]("nats"), UNIT_CALLS[name]("bits")
    assert torch.equal(nats, UNIT_CALLS[name](unit.default))
    torch.testing.assert_close(bits * math.log(2), nats, rtol=1e-14, atol=0)
    with pytest.raises(
        ValueError,
        match=rf"^{name}: argument 'unit' must be one of \['bits', 'nats'\], got 'dits'$",
    ):
        UNIT_CALLS[name]("dits")


@pytest.mark.parametrize("qualified", sorted(ALL_SIGNATURES))
def test_only_information_functions_take_a_unit(qualified):
    # The objects you train with are in nats, so that terms add up and beta means what the
    # config says; no other function has a unit to choose.
    if "unit" in ALL_SIGNATURES[qualified].parameters:
        owner = qualified.split(".")[0]
        assert owner == qualified and CONVENTIONS[owner][1], f"{qualified} takes unit="


def test_uniform_prior_rate_in_bits_is_log2_of_the_codebook():
    assert uniform_prior_rate(7, 512, unit="bits") == pytest.approx(7 * 9, rel=1e-15)


# --------------------------------------------------------------------------------------------
# Old spellings: a warning naming the new one, the old value; or an error naming it
# --------------------------------------------------------------------------------------------

IMAGES = torch.rand(4, 3, 2, 2, generator=torch.Generator().manual_seed(3))
MEANS = torch.rand(4, 3, 2, 2, generator=torch.Generator().manual_seed(4))


def _deprecated(call, *fragments):
    with pytest.warns(DeprecationWarning) as record:
        value = call()
    assert len(record) == 1, [str(w.message) for w in record]
    message = str(record[0].message)
    for fragment in fragments:
        assert fragment in message, message
    assert record[0].filename == __file__, "the warning must point at the caller's line"
    return value


def test_gaussian_nll_log_sigma_keyword_still_works_as_logvar_twice_it():
    log_sigma = torch.tensor(-0.7, requires_grad=True)
    old = _deprecated(
        lambda: gaussian_nll(MEANS, IMAGES, log_sigma=log_sigma),
        "gaussian_nll: argument 'log_sigma' is deprecated (removed in 0.3)",
        "write gaussian_nll(mean, target, logvar=2 * log_sigma)",
    )
    assert torch.equal(old, gaussian_nll(MEANS, IMAGES, logvar=2 * log_sigma))
    (gradient,) = torch.autograd.grad(old.sum(), log_sigma)  # still differentiable in log sigma
    assert torch.isfinite(gradient)
    with pytest.raises(TypeError, match="got both 'log_sigma' \\(deprecated\\) and 'logvar'"):
        gaussian_nll(MEANS, IMAGES, log_sigma=0.0, logvar=0.0)


def test_gaussian_nll_refuses_the_old_positional_spread():
    # Its third positional argument was log sigma; read as logvar it would halve sigma's log.
    with pytest.raises(
        TypeError,
        match=r"^gaussian_nll: the spread is the keyword-only logvar = log sigma\^2; .* was "
        r"log_sigma = log sigma; write gaussian_nll\(mean, target, logvar=2 \* log_sigma\)$",
    ):
        gaussian_nll(MEANS, IMAGES, -0.7)


def test_laplace_nll_positional_spread_still_works():
    old = _deprecated(
        lambda: laplace_nll(MEANS, IMAGES, -0.7),
        "laplace_nll: passing 'log_scale' by position is deprecated",
        "write laplace_nll(loc, target, log_scale=...)",
    )
    assert torch.equal(old, laplace_nll(MEANS, IMAGES, log_scale=-0.7))


def test_kl_divergence_refuses_positional_tensors_in_either_order():
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(5))
    labels = torch.arange(8)
    smooth = F.one_hot(labels, 10).float() * 0.9 + 0.01
    loss = KLDivergence(from_logits=True)
    for args in ((smooth, logits), (logits, smooth)):  # the old order, and torch's
        with pytest.raises(
            TypeError,
            match=r"^KLDivergence: the tensors are keyword-only: in version 0\.1 they were "
            r"positional in the order \(target, predicted\).*; write loss\(predicted=\.\.\., "
            r"target=\.\.\.\)$",
        ):
            loss(*args)
    # The keywords did not change: a call by keyword means what it meant.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = loss(target=smooth, predicted=logits)
    expected = F.cross_entropy(logits, labels, label_smoothing=0.1) - entropy(smooth).mean()
    torch.testing.assert_close(value, expected)


@pytest.mark.parametrize("name", ["bernoulli", "gaussian", "laplace"])
def test_pixel_likelihood_x_keyword_still_works_and_the_model_path_warns_about_nothing(name):
    likelihood = PixelLikelihood(name, num_dims=12, channels=3, sigma=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # what the models call: the current spelling
        new = likelihood(MEANS, IMAGES)
    old = _deprecated(
        lambda: likelihood(MEANS, x=IMAGES),
        "PixelLikelihood: argument 'x' is deprecated",
        "write likelihood(params, target)",
    )
    assert torch.equal(old, new)  # no data_levels: no dequantisation noise


def test_pixel_likelihood_gaussian_numbers_are_those_of_its_log_sigma():
    # PixelLikelihood holds log sigma (its checkpoints do) and passes logvar = 2 log sigma:
    # bit for bit the log-sigma formula, values and gradients.
    likelihood = PixelLikelihood("gaussian", num_dims=12, channels=3, sigma=0.37, learn_sigma=True)
    means = MEANS.clone().requires_grad_(True)
    ours = likelihood(means, IMAGES)
    log_sigma = likelihood.log_sigma
    by_hand = (
        (
            0.5 * math.log(2 * math.pi)
            + log_sigma
            + 0.5 * ((IMAGES - means) * torch.exp(-log_sigma)) ** 2
        )
        .flatten(1)
        .sum(1)
    )
    assert torch.equal(ours, by_hand)
    grads = torch.autograd.grad(ours.sum(), (means, log_sigma))
    expected = torch.autograd.grad(by_hand.sum(), (means, log_sigma))
    assert all(torch.equal(g, e) for g, e in zip(grads, expected, strict=True))
