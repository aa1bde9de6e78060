"""One ELBO, many regularisers: terms, penalties, gradients, factory, checkpoint state."""

import io

import pytest
import torch

from vae.losses import (
    BetaKL,
    CapacityKL,
    CapacitySchedule,
    ConstantBeta,
    CyclicalBeta,
    ELBOTerms,
    FreeBitsKL,
    LinearWarmup,
    build_regulariser,
    compute_elbo,
    gaussian_kl,
)


def _batch(batch=4, dims=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    recon = torch.rand(batch, generator=g, dtype=torch.float64) * 100
    kl = torch.rand(batch, dims, generator=g, dtype=torch.float64) * 2
    return recon, kl


def test_compute_elbo_terms_and_units():
    recon, kl = _batch()
    terms = compute_elbo(recon, kl, BetaKL(ConstantBeta(beta=4.0)), step=0)
    assert isinstance(terms, ELBOTerms)
    kl_per_example = kl.sum(1)  # nats per example: sum over latent dims
    torch.testing.assert_close(terms.recon, recon.mean())
    torch.testing.assert_close(terms.kl, kl_per_example.mean())
    torch.testing.assert_close(terms.kl_per_dim, kl.mean(0))
    torch.testing.assert_close(terms.kl_per_dim.sum(), terms.kl)
    torch.testing.assert_close(terms.elbo, -(recon + kl_per_example).mean())
    torch.testing.assert_close(terms.penalty, 4.0 * kl_per_example.mean())
    torch.testing.assert_close(terms.loss, recon.mean() + 4.0 * kl_per_example.mean())
    assert terms.beta == 4.0 and terms.capacity is None
    assert set(terms.scalars()) == {"loss", "recon", "kl", "elbo", "beta", "penalty"}


def test_compute_elbo_flattens_latent_maps_and_accepts_a_number():
    recon = torch.zeros(3)
    kl = torch.rand(3, 2, 4, 4)  # e.g. a convolutional latent
    terms = compute_elbo(recon, kl, 1.0)
    assert terms.kl_per_dim.shape == (32,)
    torch.testing.assert_close(terms.kl, kl.sum((1, 2, 3)).mean())
    torch.testing.assert_close(terms.loss, terms.kl)


def test_the_elbo_does_not_depend_on_the_regulariser():
    recon, kl = _batch(seed=1)
    regularisers = [
        BetaKL(ConstantBeta(beta=1.0)),
        BetaKL(LinearWarmup(beta=1.0, warmup_steps=100)),
        CapacityKL(gamma=100.0, schedule=CapacitySchedule(c_max=5.0, steps=10)),
        FreeBitsKL(free_bits=1.5),  # above some dims' KL, so it clamps
    ]
    results = [compute_elbo(recon, kl, r, step=3) for r in regularisers]
    for terms in results[1:]:
        assert torch.equal(terms.elbo, results[0].elbo)
        assert torch.equal(terms.kl, results[0].kl) and torch.equal(terms.recon, results[0].recon)
    assert len({float(t.loss) for t in results}) == len(results), "only the penalty differs"


def test_plain_elbo_gradient_matches_closed_form():
    mu = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    terms = compute_elbo(torch.zeros(5, dtype=torch.float64), gaussian_kl(mu, logvar), BetaKL())
    terms.loss.backward()
    torch.testing.assert_close(mu.grad, mu.detach() / 5)  # batch mean
    torch.testing.assert_close(logvar.grad, 0.5 * torch.expm1(logvar.detach()) / 5)


def test_warmup_beta_follows_the_step():
    recon, kl = _batch()
    regulariser = BetaKL(schedule=LinearWarmup(beta=1.0, warmup_steps=10))
    for step, beta in [(0, 0.0), (5, 0.5), (10, 1.0), (50, 1.0)]:
        terms = compute_elbo(recon, kl, regulariser, step)
        assert terms.beta == pytest.approx(beta)
        torch.testing.assert_close(terms.penalty, beta * terms.kl)


def test_capacity_penalty_and_gradient_sign():
    kl = torch.full((2, 4), 0.5, requires_grad=True)  # KL per example = 2 nats
    regulariser = CapacityKL(gamma=10.0, schedule=CapacitySchedule(c_max=8.0, steps=100))
    # step 0: C = 0 < KL, penalty 10 * 2, pushes KL down.
    terms = compute_elbo(torch.zeros(2), kl, regulariser, step=0)
    assert terms.capacity == 0.0 and terms.beta == 10.0
    torch.testing.assert_close(terms.penalty, torch.tensor(20.0))
    (grad,) = torch.autograd.grad(terms.loss, kl)
    torch.testing.assert_close(grad, torch.full((2, 4), 10.0 / 2))
    # step 50: C = 4 > KL, penalty 10 * 2, pushes KL up.
    terms = compute_elbo(torch.zeros(2), kl, regulariser, step=50)
    assert terms.capacity == 4.0 and terms.scalars()["capacity"] == 4.0
    torch.testing.assert_close(terms.penalty, torch.tensor(20.0))
    (grad,) = torch.autograd.grad(terms.loss, kl)
    torch.testing.assert_close(grad, torch.full((2, 4), -10.0 / 2))


def test_free_bits_value_and_gradients_per_dim():
    # Batch-mean KL per dim: [0.1, 0.5, 2.0]; lambda = 0.5.
    kl = torch.tensor([[0.0, 0.4, 1.0], [0.2, 0.6, 3.0]], requires_grad=True)
    penalty, beta = FreeBitsKL(free_bits=0.5, schedule=2.0)(kl, step=0)
    assert beta == 2.0
    torch.testing.assert_close(penalty, torch.tensor(2.0 * (0.5 + 0.5 + 2.0)))
    penalty.backward()
    # Dims at or below lambda get exactly zero gradient; the rest get beta / batch_size.
    expected = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    assert torch.equal(kl.grad, expected)


def test_free_bits_groups():
    kl = torch.tensor([[0.1, 0.1, 1.0, 1.0]], requires_grad=True)  # groups: 0.2 and 2.0 nats
    penalty, _ = FreeBitsKL(free_bits=0.5, groups=2)(kl, step=0)
    torch.testing.assert_close(penalty, torch.tensor(0.5 + 2.0))
    penalty.backward()
    assert torch.equal(kl.grad, torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="'groups'=3 does not divide the 4 latent dims"):
        FreeBitsKL(free_bits=0.5, groups=3)(kl, step=0)


def test_free_bits_reports_the_true_kl_not_the_clamped_one():
    kl = torch.full((2, 3), 0.01)
    terms = compute_elbo(torch.zeros(2), kl, FreeBitsKL(free_bits=1.0), step=0)
    torch.testing.assert_close(terms.kl, torch.tensor(0.03))
    torch.testing.assert_close(terms.penalty, torch.tensor(3.0))


@pytest.mark.parametrize(
    "kind, kwargs, expected_type, beta_at_5",
    [
        ("constant", {"beta": 3.0}, BetaKL, 3.0),
        ("linear", {"beta": 1.0, "warmup_steps": 10}, BetaKL, 0.5),
        ("cyclical", {"beta": 1.0, "cycle_steps": 4, "ratio": 0.5}, BetaKL, 0.5),
        ("capacity", {"gamma": 7.0, "c_max": 2.0, "steps": 10}, CapacityKL, 7.0),
        ("free_bits", {"free_bits": 0.1, "groups": 2, "beta": 2.0}, FreeBitsKL, 2.0),
    ],
)
def test_build_regulariser(kind, kwargs, expected_type, beta_at_5):
    regulariser = build_regulariser(kind, **kwargs)
    assert isinstance(regulariser, expected_type)
    _, beta = regulariser(torch.ones(2, 4), step=5)
    assert beta == pytest.approx(beta_at_5)


def test_build_regulariser_errors():
    with pytest.raises(ValueError, match="'kind' must be one of .*'free_bits'"):
        build_regulariser("beta_tc")
    with pytest.raises(ValueError, match="bad keyword arguments \\['warmup'\\] for kind='linear'"):
        build_regulariser("linear", warmup=10)
    with pytest.raises(ValueError, match="'gamma'"):
        build_regulariser("capacity", gamma=-1.0, c_max=1.0, steps=1)


@pytest.mark.parametrize(
    "make",
    [
        lambda: BetaKL(CyclicalBeta(beta=2.0, cycle_steps=10, ratio=0.3)),
        lambda: CapacityKL(gamma=5.0, schedule=CapacitySchedule(c_max=3.0, steps=7)),
        lambda: FreeBitsKL(free_bits=0.25, schedule=LinearWarmup(warmup_steps=9), groups=2),
    ],
)
def test_regulariser_state_round_trip(make):
    regulariser = make()
    kl = torch.rand(3, 4)
    regulariser(kl, step=6)
    buffer = io.BytesIO()
    torch.save(regulariser.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    restored = make()
    # Change the hyper-parameters: loading must bring the checkpoint's values back.
    for name in ("gamma", "free_bits"):
        if hasattr(restored, name):
            setattr(restored, name, 123.0)
    restored.load_state_dict(state)
    assert restored.schedule.last_step == 6
    for step in (0, 3, 6, 11, 40):
        assert restored(kl, step)[1] == regulariser(kl, step)[1]
        torch.testing.assert_close(restored(kl, step)[0], regulariser(kl, step)[0])
    with pytest.raises(ValueError, match="does not match"):
        BetaKL().load_state_dict({**state, "kind": "Other"})


def test_input_shape_errors():
    with pytest.raises(
        ValueError, match="batch sizes differ: 'recon_nll' has 3.*'kl_elementwise' has 4"
    ):
        compute_elbo(torch.zeros(3), torch.zeros(4, 2))
    with pytest.raises(
        ValueError, match="'recon_nll' must be the per-example NLL of shape \\(B,\\)"
    ):
        compute_elbo(torch.zeros(3, 5), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="'kl_elementwise' must have shape"):
        compute_elbo(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="'kl_elementwise' contains 1 NaN"):
        compute_elbo(torch.zeros(2), torch.tensor([[0.0], [float("nan")]]))
    with pytest.raises(ValueError, match="BetaKL: argument 'schedule'"):
        BetaKL(schedule="linear")
    with pytest.raises(
        ValueError, match="CapacityKL: argument 'schedule' must be a CapacitySchedule"
    ):
        CapacityKL(gamma=1.0, schedule=ConstantBeta())


def test_an_empty_batch_is_an_error_not_nan():
    with pytest.raises(
        ValueError,
        match=r"compute_elbo: argument 'recon_nll' is an empty batch \(shape \(0,\)\); "
        r"pass at least one example",
    ):
        compute_elbo(torch.zeros(0), torch.zeros(0, 8))
    with pytest.raises(ValueError, match="compute_elbo: argument 'recon_nll' is an empty batch"):
        compute_elbo(torch.zeros(0), torch.zeros(0, 8), validate=False)  # a shape check
    for regulariser in (
        BetaKL(),
        CapacityKL(gamma=1.0, schedule=CapacitySchedule(c_max=5.0, steps=10)),
        FreeBitsKL(free_bits=0.5),
    ):
        name = type(regulariser).__name__
        with pytest.raises(
            ValueError, match=rf"{name}: argument 'kl' is an empty batch \(shape \(0, 8\)\)"
        ):
            regulariser(torch.zeros(0, 8), 0)
