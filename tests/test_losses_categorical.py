"""Categorical KL, entropy, cross-entropy and the KLDivergence module.

Oracles: torch.distributions (Categorical) and scipy (rel_entr, entropy). Property tests
with hypothesis cover the information-theoretic identities and the non-metric behaviour.
"""

import math

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from scipy.special import rel_entr
from scipy.stats import entropy as scipy_entropy
from torch.distributions import Categorical, kl_divergence

from vae.losses import (
    KLDivergence,
    categorical_kl,
    categorical_kl_from_logits,
    cross_entropy,
    entropy,
    validation,
)

PROPERTY = settings(max_examples=100, deadline=None)


def _random_probs(*shape, generator, dtype=torch.float64, zeros=0.0):
    """Random distributions along the last dim, with a fraction ``zeros`` of exact zeros."""
    x = torch.rand(*shape, generator=generator, dtype=torch.float64)
    x = torch.where(torch.rand(*shape, generator=generator, dtype=torch.float64) < zeros, 0.0, x)
    x[..., 0] += 1e-3  # every row keeps some mass
    return (x / x.sum(-1, keepdim=True)).to(dtype)


@st.composite
def distributions(draw, size=None, allow_zeros=True):
    n = size if size is not None else draw(st.integers(2, 8))
    # Exact zeros, or weights >= 1e-6 so that products of two distributions cannot underflow.
    weight = st.floats(1e-6, 1.0)
    if allow_zeros:
        weight = st.one_of(st.just(0.0), weight)
    weights = draw(st.lists(weight, min_size=n, max_size=n))
    if sum(weights) == 0:
        weights[0] = 1.0
    w = torch.tensor(weights, dtype=torch.float64)
    return w / w.sum()


@st.composite
def distribution_pairs(draw, allow_zeros=True):
    n = draw(st.integers(2, 8))
    return draw(distributions(n, allow_zeros)), draw(distributions(n, allow_zeros))


# --------------------------------------------------------------------------------------------
# Oracles
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_categorical_kl_matches_torch_and_scipy_with_zeros_and_support_mismatch(dtype):
    g = torch.Generator().manual_seed(0)
    p = _random_probs(256, 6, generator=g, dtype=dtype, zeros=0.3)
    q = _random_probs(256, 6, generator=g, dtype=dtype, zeros=0.3)
    ours = categorical_kl(p, q)
    scipy_kl = torch.from_numpy(rel_entr(p.double().numpy(), q.double().numpy()).sum(-1))
    torch_kl = kl_divergence(Categorical(probs=p.double()), Categorical(probs=q.double()))
    mismatch = ((q == 0) & (p > 0)).any(-1)
    assert mismatch.any() and (~mismatch).any(), "the batch must exercise both cases"
    assert torch.isinf(ours[mismatch]).all() and (ours[mismatch] > 0).all()
    assert torch.isinf(scipy_kl[mismatch]).all() and torch.isinf(torch_kl[mismatch]).all()
    tol = {torch.float32: 2e-5, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(ours.double()[~mismatch], scipy_kl[~mismatch], rtol=tol, atol=tol)
    torch.testing.assert_close(ours.double()[~mismatch], torch_kl[~mismatch], rtol=tol, atol=tol)
    assert ours.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_entropy_and_cross_entropy_match_scipy(dtype):
    g = torch.Generator().manual_seed(1)
    p = _random_probs(64, 5, generator=g, dtype=dtype, zeros=0.3)
    q = _random_probs(64, 5, generator=g, dtype=dtype)
    tol = {torch.float32: 2e-5, torch.float64: 1e-12}[dtype]
    expected_h = torch.from_numpy(scipy_entropy(p.double().numpy(), axis=-1))
    torch.testing.assert_close(entropy(p).double(), expected_h, rtol=tol, atol=tol)
    torch.testing.assert_close(
        entropy(p, unit="bits").double(),
        torch.from_numpy(scipy_entropy(p.double().numpy(), base=2, axis=-1)),
        rtol=tol,
        atol=tol,
    )
    # scipy.stats.entropy(p, q) is the KL; H(p, q) = H(p) + KL(p || q).
    expected_ce = expected_h + torch.from_numpy(
        scipy_entropy(p.double().numpy(), q.double().numpy(), axis=-1)
    )
    torch.testing.assert_close(cross_entropy(p, q).double(), expected_ce, rtol=tol, atol=tol)


def test_cross_entropy_conventions():
    p = torch.tensor([0.0, 0.5, 0.5])
    assert cross_entropy(p, torch.tensor([0.0, 0.5, 0.5])).item() == pytest.approx(math.log(2))
    assert cross_entropy(p, torch.tensor([0.5, 0.5, 0.0])).item() == math.inf
    assert entropy(torch.tensor([1.0, 0.0, 0.0])).item() == 0.0


# --------------------------------------------------------------------------------------------
# Worked example and the epsilon trap
# --------------------------------------------------------------------------------------------


def test_worked_example_kl_is_0_8_ln_9():
    # KL = 0.1 ln(0.1/0.9) + 0.9 ln(0.9/0.1) = (0.9 - 0.1) ln 9.
    p, q = (
        torch.tensor([0.1, 0.9], dtype=torch.float64),
        torch.tensor([0.9, 0.1], dtype=torch.float64),
    )
    assert categorical_kl(p, q).item() == pytest.approx(0.8 * math.log(9), rel=1e-15)
    assert categorical_kl(p.float(), q.float()).item() == pytest.approx(0.8 * math.log(9), rel=1e-6)


def test_epsilon_clamped_tutorial_version_gives_finite_wrong_answer():
    def tutorial_kl(p, q, eps=1e-10):
        # The common blog-post implementation: clamp away the zeros "for stability".
        return (p * torch.log(p.clamp_min(eps) / q.clamp_min(eps))).sum(-1)

    p = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    q = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    tutorial = tutorial_kl(p, q).item()
    assert math.isfinite(tutorial)
    assert tutorial == pytest.approx(0.5 * math.log(0.5) + 0.5 * math.log(0.5 / 1e-10))
    # The true KL is infinite: p puts mass on an outcome q calls impossible.
    assert categorical_kl(p, q).item() == math.inf
    assert rel_entr(p.numpy(), q.numpy()).sum() == math.inf
    # And the answer depends on an arbitrary constant, which a divergence must not.
    assert tutorial_kl(p, q, eps=1e-20).item() != pytest.approx(tutorial)


def test_zero_p_terms_vanish_even_where_q_is_zero():
    p = torch.tensor([0.0, 1.0])
    assert categorical_kl(p, torch.tensor([0.0, 1.0])).item() == 0.0
    assert categorical_kl(p, torch.tensor([0.5, 0.5])).item() == pytest.approx(math.log(2))


def test_gradients_are_finite_wherever_the_kl_is_finite():
    p = torch.tensor([[0.0, 0.3, 0.7], [0.2, 0.0, 0.8]], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([[0.0, 0.5, 0.5], [0.1, 0.1, 0.8]], dtype=torch.float64, requires_grad=True)
    kl = categorical_kl(p, q)
    assert torch.isfinite(kl).all()
    kl.sum().backward()
    assert torch.isfinite(p.grad).all() and torch.isfinite(q.grad).all()
    # dKL/dq_i = -p_i / q_i where p_i > 0, and 0 where p_i = 0.
    expected = torch.where(p > 0, -p / q.where(q > 0, 1.0), 0.0).detach()
    torch.testing.assert_close(q.grad, expected)


def test_entropy_gradient_is_finite_at_zero_probabilities():
    p = torch.tensor([0.0, 0.25, 0.75], requires_grad=True)
    entropy(p).backward()
    assert torch.isfinite(p.grad).all()


# --------------------------------------------------------------------------------------------
# Logits
# --------------------------------------------------------------------------------------------


def test_from_logits_matches_probabilities_and_torch():
    g = torch.Generator().manual_seed(2)
    a, b = (
        torch.randn(32, 7, generator=g, dtype=torch.float64),
        torch.randn(32, 7, generator=g, dtype=torch.float64),
    )
    ours = categorical_kl_from_logits(a, b)
    torch.testing.assert_close(ours, categorical_kl(a.softmax(-1), b.softmax(-1)))
    torch.testing.assert_close(ours, kl_divergence(Categorical(logits=a), Categorical(logits=b)))


def test_from_logits_is_finite_and_correct_for_huge_logits():
    p_logits = torch.tensor([[1e4, -1e4, 0.0]])
    q_logits = torch.tensor([[0.0, 1e4, -1e4]])
    kl = categorical_kl_from_logits(p_logits, q_logits)
    # p is (1, 0, 0) to float32 precision; log q_0 = -1e4, so KL = 1e4.
    assert torch.isfinite(kl).all()
    assert kl.item() == pytest.approx(1e4, rel=1e-6)
    # softmax-then-log underflows to log(0) and reports +inf instead.
    assert (
        categorical_kl(p_logits.softmax(-1), q_logits.softmax(-1), validate=False).item()
        == math.inf
    )


def test_from_logits_minus_inf_means_probability_zero():
    neg_inf = -math.inf
    p = torch.tensor([0.0, neg_inf])
    q = torch.tensor([neg_inf, 0.0])
    assert categorical_kl_from_logits(p, q).item() == math.inf
    assert categorical_kl_from_logits(q, q).item() == 0.0


# --------------------------------------------------------------------------------------------
# Broadcasting and dim
# --------------------------------------------------------------------------------------------


def test_any_dim_and_broadcasting():
    g = torch.Generator().manual_seed(3)
    p = _random_probs(4, 6, 5, generator=g)  # distributions along the last dim
    q = _random_probs(6, 5, generator=g)  # one q per middle index, broadcast over the first
    expected = categorical_kl(p, q.expand(4, 6, 5))
    torch.testing.assert_close(categorical_kl(p, q), expected)
    # The same numbers with the event dimension moved to the front.
    torch.testing.assert_close(
        categorical_kl(p.movedim(-1, 0), q.movedim(-1, 0).unsqueeze(1), dim=0), expected
    )
    torch.testing.assert_close(categorical_kl(p.movedim(-1, 1), q.movedim(-1, 0), dim=1), expected)
    torch.testing.assert_close(entropy(p.movedim(-1, 1), dim=1), entropy(p))


def test_event_dim_may_not_be_broadcast():
    with pytest.raises(ValueError, match="'q'.*event size 3"):
        categorical_kl(torch.full((2, 3), 1 / 3), torch.ones(2, 1))


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


@PROPERTY
@given(distribution_pairs())
def test_property_nonnegative_with_pinsker_bound(pq):
    # Gibbs' inequality, sharpened by Pinsker: KL(p||q) >= 0.5 * ||p - q||_1^2, so the KL is
    # strictly positive whenever p != q.
    p, q = pq
    kl = categorical_kl(p, q).item()
    assert kl >= 0.5 * (p - q).abs().sum().item() ** 2 - 1e-12


@PROPERTY
@given(distributions())
def test_property_zero_iff_equal(p):
    assert categorical_kl(p, p).item() == 0.0
    shifted = torch.roll(p, 1)
    if not torch.allclose(shifted, p):
        assert categorical_kl(p, shifted).item() > 0


def test_asymmetry_counterexample():
    p = torch.tensor([0.5, 0.5], dtype=torch.float64)
    q = torch.tensor([0.9, 0.1], dtype=torch.float64)
    forward = categorical_kl(p, q).item()  # 0.5 ln(5/9) + 0.5 ln 5 = 0.5 ln(25/9)
    reverse = categorical_kl(q, p).item()  # 0.9 ln 1.8 + 0.1 ln 0.2
    assert forward == pytest.approx(0.5 * math.log(25 / 9))
    assert reverse == pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2))
    assert forward > reverse + 0.1


def test_triangle_inequality_fails():
    a = torch.tensor([0.9, 0.1], dtype=torch.float64)
    b = torch.tensor([0.5, 0.5], dtype=torch.float64)
    c = torch.tensor([0.1, 0.9], dtype=torch.float64)
    direct = categorical_kl(a, c).item()  # 0.8 ln 9 = 1.758
    via_b = categorical_kl(a, b).item() + categorical_kl(b, c).item()  # 0.368 + 0.511
    assert direct == pytest.approx(0.8 * math.log(9))
    assert direct > via_b + 0.8


@PROPERTY
@given(distribution_pairs())
def test_property_kl_is_cross_entropy_minus_entropy(pq):
    p, q = pq
    kl, ce, h = categorical_kl(p, q), cross_entropy(p, q), entropy(p)
    if math.isinf(kl.item()):
        assert math.isinf(ce.item())
    else:
        torch.testing.assert_close(kl, ce - h, rtol=1e-9, atol=1e-12)


@PROPERTY
@given(distribution_pairs(), distribution_pairs())
def test_property_additive_over_independent_dims(pq1, pq2):
    (p1, q1), (p2, q2) = pq1, pq2
    joint_p = (p1[:, None] * p2[None, :]).flatten()
    joint_q = (q1[:, None] * q2[None, :]).flatten()
    total = categorical_kl(p1, q1) + categorical_kl(p2, q2)
    joint = categorical_kl(joint_p, joint_q)
    if math.isinf(total.item()):
        assert math.isinf(joint.item())
    else:
        torch.testing.assert_close(joint, total, rtol=1e-9, atol=1e-12)


@PROPERTY
@given(distribution_pairs(), st.randoms(use_true_random=False))
def test_property_invariant_under_a_shared_permutation(pq, rng):
    p, q = pq
    perm = list(range(p.numel()))
    rng.shuffle(perm)
    perm = torch.tensor(perm)
    torch.testing.assert_close(
        categorical_kl(p[perm], q[perm]), categorical_kl(p, q), rtol=1e-12, atol=1e-14
    )
    torch.testing.assert_close(entropy(p[perm]), entropy(p), rtol=1e-12, atol=1e-14)


@PROPERTY
@given(distribution_pairs())
def test_property_matches_scipy(pq):
    p, q = pq
    expected = rel_entr(p.numpy(), q.numpy()).sum()
    ours = categorical_kl(p, q).item()
    assert ours == expected or ours == pytest.approx(expected, rel=1e-10, abs=1e-14)


# --------------------------------------------------------------------------------------------
# KLDivergence module
# --------------------------------------------------------------------------------------------


def test_kl_divergence_module_argument_order_and_reductions():
    g = torch.Generator().manual_seed(4)
    target = _random_probs(4, 3, 5, generator=g)  # (batch, time, classes)
    predicted = _random_probs(4, 3, 5, generator=g)
    per_row = categorical_kl(target, predicted)  # KL(target || predicted), shape (4, 3)
    torch.testing.assert_close(KLDivergence("none")(predicted=predicted, target=target), per_row)
    torch.testing.assert_close(
        KLDivergence("sum")(predicted=predicted, target=target), per_row.sum()
    )
    torch.testing.assert_close(
        KLDivergence("mean")(predicted=predicted, target=target), per_row.mean()
    )
    torch.testing.assert_close(
        KLDivergence()(predicted=predicted, target=target), per_row.sum() / 4
    )
    # F.kl_div takes (log predicted, target): same batchmean number, opposite order.
    torch.testing.assert_close(
        KLDivergence()(predicted=predicted, target=target),
        F.kl_div(predicted.log(), target, reduction="batchmean"),
    )
    # The order matters.
    assert not torch.allclose(
        KLDivergence()(predicted=target, target=predicted),
        KLDivergence()(predicted=predicted, target=target),
    )


def test_kl_divergence_module_from_logits_distillation():
    g = torch.Generator().manual_seed(5)
    teacher = torch.randn(8, 10, generator=g, requires_grad=False)
    student = torch.randn(8, 10, generator=g, requires_grad=True)
    loss = KLDivergence(from_logits=True, target_from_logits=True)(
        predicted=student, target=teacher
    )
    torch.testing.assert_close(loss, categorical_kl_from_logits(teacher, student).mean())
    expected = F.kl_div(
        student.log_softmax(-1), teacher.log_softmax(-1), reduction="batchmean", log_target=True
    )
    torch.testing.assert_close(loss, expected)
    loss.backward()
    # d/dstudent_logits of KL(t || softmax(s)) = softmax(s) - t, divided by the batch size.
    torch.testing.assert_close(
        student.grad, (student.softmax(-1) - teacher.softmax(-1)).detach() / 8
    )


def test_kl_divergence_module_label_smoothing_and_errors():
    labels = torch.tensor([0, 2])
    smooth = F.one_hot(labels, 3).double() * 0.9 + 0.1 / 3
    predicted = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=torch.float64)
    expected = np.mean(
        [rel_entr(s, p).sum() for s, p in zip(smooth.numpy(), predicted.numpy(), strict=True)]
    )
    assert KLDivergence()(predicted=predicted, target=smooth).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="'reduction'"):
        KLDivergence(reduction="avg")
    with pytest.raises(ValueError, match="KLDivergence: argument 'predicted'"):
        KLDivergence()(predicted=predicted * 2, target=smooth)
    assert "batchmean" in repr(KLDivergence())


# --------------------------------------------------------------------------------------------
# KLDivergence(from_logits=True): logits for the prediction only (issue 12, point 4)
# --------------------------------------------------------------------------------------------


def _labels_and_logits(batch=16, classes=7, seed=11, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (batch,), generator=g)
    logits = (torch.randn(batch, classes, generator=g, dtype=dtype) * 3).requires_grad_()
    return labels, logits


def test_from_logits_with_one_hot_targets_is_cross_entropy():
    labels, logits = _labels_and_logits()
    one_hot = F.one_hot(labels, 7).double()
    loss = KLDivergence(from_logits=True)(
        predicted=logits, target=one_hot
    )  # H(one_hot) = 0: KL = CE
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    # d/dlogits of the batch-mean KL = (softmax(logits) - one_hot) / B
    torch.testing.assert_close(logits.grad, (logits.softmax(-1) - one_hot).detach() / 16)


@pytest.mark.parametrize("smoothing", [0.0, 0.05, 0.1, 0.5, 1.0])
def test_from_logits_with_label_smoothing_is_cross_entropy_minus_target_entropy(smoothing):
    labels, logits = _labels_and_logits(seed=12)
    smooth = F.one_hot(labels, 7).double() * (1 - smoothing) + smoothing / 7
    loss = KLDivergence(from_logits=True)(predicted=logits, target=smooth)
    expected = F.cross_entropy(logits, labels, label_smoothing=smoothing) - entropy(smooth).mean()
    torch.testing.assert_close(loss, expected)


def test_from_logits_does_not_softmax_the_target_probabilities():
    labels, logits = _labels_and_logits(seed=13)
    smooth = F.one_hot(labels, 7).double() * 0.9 + 0.1 / 7
    loss = KLDivergence("none", from_logits=True)(predicted=logits, target=smooth)
    wrong = categorical_kl_from_logits(smooth, logits)  # KL(softmax(smooth) || ...)
    assert (loss - wrong).abs().min() > 0.01
    torch.testing.assert_close(loss, categorical_kl(smooth, logits.softmax(-1)))


def test_target_from_logits_is_categorical_kl_from_logits():
    g = torch.Generator().manual_seed(14)
    teacher = torch.randn(5, 3, 9, generator=g, dtype=torch.float64)
    student = torch.randn(5, 3, 9, generator=g, dtype=torch.float64)
    per_row = categorical_kl_from_logits(teacher, student)
    both = {"from_logits": True, "target_from_logits": True}
    torch.testing.assert_close(
        KLDivergence("none", **both)(predicted=student, target=teacher), per_row
    )
    torch.testing.assert_close(
        KLDivergence(**both)(predicted=student, target=teacher), per_row.sum() / 5
    )
    # Teacher logits against student probabilities: the same number.
    torch.testing.assert_close(
        KLDivergence("none", target_from_logits=True)(
            predicted=student.softmax(-1), target=teacher
        ),
        per_row,
    )


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
def test_from_logits_reductions(reduction):
    g = torch.Generator().manual_seed(15)
    target = _random_probs(4, 3, 5, generator=g, zeros=0.3)  # (batch, time, classes)
    logits = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    per_row = categorical_kl(target, logits.softmax(-1))
    expected = {
        "none": per_row,
        "sum": per_row.sum(),
        "mean": per_row.mean(),
        "batchmean": per_row.sum() / 4,
    }[reduction]
    torch.testing.assert_close(
        KLDivergence(reduction, from_logits=True)(predicted=logits, target=target), expected
    )


def test_from_logits_edge_cases_are_exact_with_finite_gradients():
    inf = math.inf
    logits = torch.tensor([[0.0, -inf, 1.0], [0.0, -inf, 1.0]], requires_grad=True)
    target = torch.tensor([[0.5, 0.0, 0.5], [0.5, 0.5, 0.0]])
    kl = KLDivergence("none", from_logits=True)(predicted=logits, target=target)
    # Row 0: the target puts no mass where the prediction has none: 0 * log(0/0) = 0.
    log_q = torch.log_softmax(logits.detach()[0], -1)
    expected = 0.5 * (math.log(0.5) - log_q[0]) + 0.5 * (math.log(0.5) - log_q[2])
    assert kl[0].item() == pytest.approx(expected.item())
    # Row 1: target mass 0.5 where the predicted probability is exactly 0: +inf.
    assert kl[1].item() == inf
    target.requires_grad_()
    kl = KLDivergence("none", from_logits=True)(predicted=logits, target=target)
    kl[0].backward()
    # Row 0's gradients are finite; row 1's KL is +inf, so its target gradient may be NaN
    # (0 upstream times the infinite d/dp there, exactly as in categorical_kl).
    assert torch.isfinite(logits.grad).all() and torch.isfinite(target.grad[0]).all()


@PROPERTY
@given(distribution_pairs())
def test_property_mixed_paths_agree_with_categorical_kl(pq):
    # log of a probability is a valid logit (log 0 = -inf means probability 0).
    p, q = pq
    expected = categorical_kl(p, q)
    ours = KLDivergence("none", from_logits=True)(predicted=q.log(), target=p)
    theirs = KLDivergence("none", target_from_logits=True)(predicted=q, target=p.log())
    for value in (ours, theirs):
        assert value.item() == expected.item() or value.item() == pytest.approx(
            expected.item(), rel=1e-10, abs=1e-12
        )


def test_from_logits_validation_of_each_argument():
    logits = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="KLDivergence: argument 'target' has rows"):
        KLDivergence(from_logits=True)(
            predicted=logits, target=torch.tensor([[2.0, 1.0, 0.5, 0.1]] * 2)
        )
    with pytest.raises(ValueError, match="KLDivergence: argument 'target' has negative"):
        KLDivergence(from_logits=True)(
            predicted=logits, target=torch.tensor([[1.5, -0.5, 0.0, 0.0]] * 2)
        )
    with pytest.raises(ValueError, match="KLDivergence: argument 'predicted' contains \\+inf"):
        KLDivergence(from_logits=True)(
            predicted=torch.tensor([[math.inf, 0, 0, 0]] * 2), target=UNIFORM_ROWS
        )
    with pytest.raises(ValueError, match="KLDivergence: argument 'target' contains \\+inf"):
        KLDivergence(target_from_logits=True)(
            predicted=UNIFORM_ROWS, target=torch.tensor([[math.inf, 0, 0, 0]] * 2)
        )
    with pytest.raises(ValueError, match="KLDivergence: argument 'predicted' has rows"):
        KLDivergence(target_from_logits=True)(
            predicted=logits, target=logits
        )  # prediction given as logits
    with pytest.raises(ValueError, match="'target_from_logits' must be True or False"):
        KLDivergence(target_from_logits="yes")
    assert "target_from_logits=True" in repr(KLDivergence(target_from_logits=True))


UNIFORM_ROWS = torch.full((2, 4), 0.25)


# --------------------------------------------------------------------------------------------
# Empty and degenerate inputs (issue 12, point 6)
# --------------------------------------------------------------------------------------------

EMPTY_BATCH = torch.empty(0, 10)


@pytest.mark.parametrize(
    "kwargs", [{}, {"from_logits": True}, {"from_logits": True, "target_from_logits": True}]
)
def test_kl_divergence_batchmean_of_an_empty_batch_is_an_error(kwargs):
    with pytest.raises(
        ValueError,
        match=r"KLDivergence: argument 'target' is an empty batch \(shape \(0, 10\)\); "
        r"pass at least one example",
    ):
        KLDivergence(**kwargs)(predicted=EMPTY_BATCH, target=EMPTY_BATCH)
    with pytest.raises(ValueError, match="argument 'predicted' is an empty batch"):
        KLDivergence(**kwargs)(
            predicted=EMPTY_BATCH, target=torch.full((10,), 0.1)
        )  # broadcast to (0,)
    with pytest.raises(ValueError, match="is an empty batch"), validation(False):
        KLDivergence(**kwargs)(
            predicted=EMPTY_BATCH, target=EMPTY_BATCH
        )  # a shape check: always on


def test_kl_divergence_mean_of_no_distributions_is_an_error():
    no_time_steps = torch.empty(4, 0, 10)
    with pytest.raises(
        ValueError,
        match=r"KLDivergence: argument 'target' holds no distributions \(shape \(4, 0, 10\)\)"
        r".*reduction='mean'",
    ):
        KLDivergence("mean")(predicted=no_time_steps, target=no_time_steps)
    with pytest.raises(ValueError, match="argument 'target' holds no distributions"):
        KLDivergence("mean", from_logits=True)(predicted=EMPTY_BATCH, target=EMPTY_BATCH)
    # batchmean of 4 examples with no time steps each: 0 nats per example, well defined.
    assert KLDivergence()(predicted=no_time_steps, target=no_time_steps).item() == 0.0


@pytest.mark.parametrize(
    "kwargs", [{}, {"from_logits": True}, {"from_logits": True, "target_from_logits": True}]
)
def test_kl_divergence_sum_and_none_of_an_empty_batch(kwargs):
    total = KLDivergence("sum", **kwargs)(predicted=EMPTY_BATCH, target=EMPTY_BATCH)
    assert total.shape == () and total.item() == 0.0  # the empty sum
    per_row = KLDivergence("none", **kwargs)(predicted=EMPTY_BATCH, target=EMPTY_BATCH)
    assert per_row.shape == (0,)


def test_elementwise_functions_keep_an_empty_batch():
    assert categorical_kl(EMPTY_BATCH, EMPTY_BATCH).shape == (0,)
    assert categorical_kl_from_logits(EMPTY_BATCH, EMPTY_BATCH).shape == (0,)
    assert entropy(EMPTY_BATCH).shape == (0,) and cross_entropy(EMPTY_BATCH, EMPTY_BATCH).shape == (
        0,
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda e: categorical_kl(e, e),
        lambda e: categorical_kl_from_logits(e, e),
        lambda e: entropy(e),
        lambda e: cross_entropy(e, e),
        lambda e: KLDivergence()(predicted=e, target=e),
        lambda e: KLDivergence(from_logits=True)(predicted=e, target=e),
        lambda e: KLDivergence(from_logits=True, target_from_logits=True)(predicted=e, target=e),
    ],
)
def test_a_distribution_over_no_outcomes_is_an_error(call):
    # A row of 0 entries sums to 0, not 1: it is no distribution, whatever the batch size.
    for rows in (torch.empty(3, 0), torch.empty(0, 0)):
        with pytest.raises(
            ValueError,
            match=r"^\w+: argument '(p|p_logits|target)' has event size 0 along dim=-1 "
            r"\(shape \(\d, 0\)\); a distribution needs at least one outcome",
        ):
            call(rows)


# --------------------------------------------------------------------------------------------
# Mixed dtypes: promoted to the common dtype before any logarithm
# --------------------------------------------------------------------------------------------

# (narrow, wide): every value of the narrow dtype is exactly a value of the wide one.
SAME_VALUES_TWO_DTYPES = [
    (torch.float32, torch.float64),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float64),
]


@pytest.mark.parametrize("narrow, wide", SAME_VALUES_TWO_DTYPES)
def test_kl_between_equal_values_in_two_dtypes_is_exactly_zero(narrow, wide):
    # Was -5.7e-8 nats for float32 against float64: log p rounded in float32, log q in float64.
    # Promoting first makes log p - log q = 0 exactly, so no clamp is needed for KL >= 0.
    g = torch.Generator().manual_seed(14)
    for k in (2, 10, 1000):
        p = _random_probs(2000, k, generator=g, dtype=narrow, zeros=0.2)
        same = p.to(wide)
        logits = (torch.randn(2000, k, generator=g, dtype=torch.float64) * 5).to(narrow)
        for kl in (
            categorical_kl(p, same),
            categorical_kl(same, p),
            KLDivergence("none")(predicted=same, target=p),
            KLDivergence("none")(predicted=p, target=same),
            categorical_kl_from_logits(logits, logits.to(wide)),
            categorical_kl_from_logits(logits.to(wide), logits),
            KLDivergence("none", from_logits=True, target_from_logits=True)(
                predicted=logits.to(wide), target=logits
            ),
            KLDivergence("none", from_logits=True, target_from_logits=True)(
                predicted=logits, target=logits.to(wide)
            ),
        ):
            assert kl.dtype == wide
            assert (kl == 0).all(), f"min {kl.min().item():.3g}"
        assert KLDivergence()(predicted=same, target=p).item() == 0.0
        # Gradients come back in each argument's own dtype, finite: d/dp = 1, d/dq = -1 here.
        p_grad, q_grad = p.clone().requires_grad_(), same.clone().requires_grad_()
        categorical_kl(p_grad, q_grad).sum().backward()
        assert p_grad.grad.dtype == narrow and q_grad.grad.dtype == wide
        assert torch.isfinite(p_grad.grad).all() and torch.isfinite(q_grad.grad).all()
        assert (
            KLDivergence("sum", from_logits=True, target_from_logits=True)(
                predicted=logits.to(wide), target=logits
            ).item()
            == 0.0
        )


@pytest.mark.parametrize("narrow, wide", SAME_VALUES_TWO_DTYPES)
def test_cross_entropy_of_mixed_dtypes_is_entropy_plus_kl_exactly(narrow, wide):
    # H(p, q) = H(p) + KL(p || q), with q = p held in a wider dtype: KL = 0 and H(p, q) = H(p),
    # both computed in the wider dtype.
    g = torch.Generator().manual_seed(15)
    p = _random_probs(500, 12, generator=g, dtype=narrow, zeros=0.2)
    same = p.to(wide)
    h_pq = cross_entropy(p, same)
    assert h_pq.dtype == wide
    assert torch.equal(h_pq, entropy(same) + categorical_kl(p, same))
    assert torch.equal(cross_entropy(same, p), entropy(same) + categorical_kl(same, p))


@settings(max_examples=200, deadline=None)
@given(pq=distribution_pairs())
def test_property_mixed_dtypes_compute_as_if_both_were_promoted(pq):
    # Promotion, not a mix: f(p32, q64) is exactly f(p32.double(), q64), in every argument
    # order and for every path (probabilities, logits, one of each).
    p64, q64 = pq
    p32, q32 = p64.float(), q64.float()
    log_p32, log_q32 = p32.log(), q32.log()  # logits, -inf where a probability is 0
    calls = [
        lambda a, b: categorical_kl(a, b),
        lambda a, b: cross_entropy(a, b),
        lambda a, b: KLDivergence("none")(predicted=b, target=a),
    ]
    logit_calls = [
        lambda a, b: categorical_kl_from_logits(a, b),
        lambda a, b: KLDivergence("none", from_logits=True, target_from_logits=True)(
            predicted=b, target=a
        ),
    ]
    for call in calls:
        assert torch.equal(call(p32, q64), call(p32.double(), q64))
        assert torch.equal(call(p64, q32), call(p64, q32.double()))
    for call in logit_calls:
        assert torch.equal(call(log_p32, q64.log()), call(log_p32.double(), q64.log()))
        assert torch.equal(call(p64.log(), log_q32), call(p64.log(), log_q32.double()))
    # One side logits, the other probabilities.
    target_probabilities = KLDivergence("none", from_logits=True)
    assert torch.equal(
        target_probabilities(predicted=q64.log(), target=p32),
        target_probabilities(predicted=q64.log(), target=p32.double()),
    )
    target_logits = KLDivergence("none", target_from_logits=True)
    assert torch.equal(
        target_logits(predicted=q64, target=log_p32),
        target_logits(predicted=q64, target=log_p32.double()),
    )
    assert torch.equal(
        target_logits(predicted=q32, target=p64.log()),
        target_logits(predicted=q32.double(), target=p64.log()),
    )
    # And KL(p || p) is exactly 0 across dtypes on every path.
    assert categorical_kl(p32, p32.double()).item() == 0.0
    assert categorical_kl_from_logits(log_p32, log_p32.double()).item() == 0.0
