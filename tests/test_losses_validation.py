"""Input validation: every error is a ValueError naming the argument; the switch works."""

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from vae.losses import (
    KLDivergence,
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
    set_validation,
    validation,
    validation_enabled,
)
from vae.losses.validation import PROBABILITY_TOLERANCE

NAN = float("nan")
INF = float("inf")
UNIFORM = torch.full((2, 4), 0.25)


@pytest.fixture(autouse=True)
def _restore_switch():
    before = validation_enabled()
    yield
    set_validation(before)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: gaussian_kl(torch.tensor([NAN]), torch.zeros(1)),
            "gaussian_kl: argument 'mu' contains 1 NaN",
        ),
        (
            lambda: gaussian_kl(torch.zeros(1), torch.tensor([INF])),
            "gaussian_kl: argument 'logvar' contains 0 NaN and 1 Inf",
        ),
        (
            lambda: gaussian_kl(torch.zeros(1), torch.zeros(1), torch.tensor([NAN])),
            "argument 'prior_mu'",
        ),
        (
            lambda: gaussian_kl(torch.zeros(3), torch.zeros(4)),
            "gaussian_kl: arguments have shapes that do not broadcast: 'mu' \\(3,\\), 'logvar' \\(4,\\)",
        ),
        (lambda: gaussian_kl([0.0], torch.zeros(1)), "argument 'mu' must be a torch.Tensor"),
        (
            lambda: gaussian_kl(torch.zeros(1, dtype=torch.long), torch.zeros(1)),
            "argument 'mu' must have a floating-point dtype",
        ),
        (
            lambda: categorical_kl(UNIFORM, torch.tensor([[0.5, 0.6, 0.0, -0.1]] * 2)),
            "categorical_kl: argument 'q' has negative entries \\(min -0.1\\); probabilities must be >= 0",
        ),
        (
            lambda: categorical_kl(UNIFORM * 2, UNIFORM),
            "argument 'p' has rows along dim=-1 that do not sum to 1",
        ),
        (lambda: categorical_kl(UNIFORM, UNIFORM, dim=2), "argument 'dim'=2 is out of range"),
        (lambda: categorical_kl(UNIFORM, torch.full((3, 4), 0.25)), "do not broadcast"),
        (
            lambda: categorical_kl(torch.tensor([NAN, 1.0]), torch.tensor([0.5, 0.5])),
            "argument 'p' contains 1 NaN",
        ),
        (
            lambda: categorical_kl_from_logits(torch.tensor([NAN, 1.0]), torch.zeros(2)),
            "argument 'p_logits' contains 1 NaN",
        ),
        (
            lambda: categorical_kl_from_logits(torch.zeros(2), torch.tensor([INF, 0.0])),
            "argument 'q_logits' contains \\+inf",
        ),
        (
            lambda: categorical_kl_from_logits(torch.zeros(2), torch.tensor([-INF, -INF])),
            "argument 'q_logits' has a row .* all -inf",
        ),
        (lambda: entropy(torch.tensor([0.5, 0.6])), "entropy: argument 'p' has rows"),
        (
            lambda: entropy(UNIFORM, unit="dits"),
            "entropy: argument 'unit' must be one of \\['bits', 'nats'\\]",
        ),
        (
            lambda: cross_entropy(UNIFORM, -UNIFORM),
            "cross_entropy: argument 'q' has negative entries",
        ),
        (
            lambda: KLDivergence()(predicted=UNIFORM * 3, target=UNIFORM),
            "KLDivergence: argument 'predicted' has rows",
        ),
        (
            lambda: KLDivergence(from_logits=True)(
                predicted=UNIFORM, target=torch.full((2, 4), NAN)
            ),
            "KLDivergence: argument 'target' contains 8 NaN",
        ),
        (
            lambda: bernoulli_nll(torch.zeros(2, 3), torch.full((2, 3), 1.5)),
            "bernoulli_nll: argument 'target' has values outside \\[0, 1\\] \\(min 1.5, max 1.5\\)",
        ),
        (
            lambda: bernoulli_nll(torch.full((2, 3), NAN), torch.zeros(2, 3)),
            "bernoulli_nll: argument 'logits' contains 6 NaN",
        ),
        (
            lambda: gaussian_nll(torch.zeros(2, 3), torch.zeros(2, 3), logvar=torch.tensor(NAN)),
            "gaussian_nll: argument 'logvar' contains 1 NaN",
        ),
        (
            lambda: laplace_nll(torch.zeros(2, 3), torch.full((2, 3), INF)),
            "laplace_nll: argument 'target' contains 0 NaN and 6 Inf",
        ),
        (
            lambda: mc_kl(torch.tensor([0.0, NAN]), torch.zeros(2)),
            "mc_kl: argument 'log_q' contains 1 NaN",
        ),
        (
            lambda: full_gaussian_kl(
                torch.zeros(2), torch.eye(2), torch.tensor([NAN, 0.0]), torch.eye(2)
            ),
            "full_gaussian_kl: argument 'mu_p' contains 1 NaN",
        ),
    ],
)
def test_errors_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --------------------------------------------------------------------------------------------
# The row-sum tolerance: every honest softmax accepted, every row off by >= 1% rejected
# --------------------------------------------------------------------------------------------

LOW_PRECISION = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
EVENT_SIZES = [2, 10, 32, 512, 10_000, 100_000]
ROW_SUM = settings(max_examples=60, deadline=None)


def _honest_softmax(seed, rows, k, scale, dtype, native):
    """softmax of N(0, scale^2) logits: computed in ``dtype`` (native) or exactly in float64
    and rounded to ``dtype``; both are what a model honestly hands to the loss."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, k, generator=g, dtype=torch.float64) * scale
    if native:
        return torch.softmax(logits.to(dtype), -1)
    return torch.softmax(logits, -1).to(dtype)


@ROW_SUM
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.sampled_from(EVENT_SIZES),
    scale=st.floats(0.0, 30.0),
    dtype=st.sampled_from(LOW_PRECISION),
    native=st.booleans(),
    upcast=st.booleans(),
)
def test_property_every_honest_softmax_is_accepted_in_every_dtype(
    seed, k, scale, dtype, native, upcast
):
    p = _honest_softmax(seed, 3, k, scale, dtype, native)
    if upcast:  # e.g. a bf16 model's output, .double()'d before the loss
        p = p.double()
    categorical_kl(p, p, validate=True)
    entropy(p, validate=True)
    cross_entropy(p, p, validate=True)


@ROW_SUM
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.sampled_from(EVENT_SIZES),
    scale=st.floats(0.0, 30.0),
    dtype=st.sampled_from(LOW_PRECISION),
    factor=st.one_of(st.floats(0.05, 0.99), st.floats(1.01, 4.0)),
    row=st.integers(0, 2),
    upcast=st.booleans(),
)
def test_property_a_row_off_by_one_percent_or_more_is_rejected_in_every_dtype(
    seed, k, scale, dtype, factor, row, upcast
):
    p = _honest_softmax(seed, 3, k, scale, torch.float64, native=False)
    p[row] *= factor
    p = p.to(dtype)
    if upcast:
        p = p.double()
    with pytest.raises(ValueError, match="argument 'p' has rows along dim=-1 that do not sum"):
        categorical_kl(p, p, validate=True)
    with pytest.raises(ValueError, match="entropy: argument 'p' has rows"):
        entropy(p, validate=True)


def _row_with_sum(values, dtype, k):
    p = torch.tensor(values, dtype=torch.float64).to(dtype)
    assert p.shape == (k,)
    return p


@pytest.mark.parametrize(
    "p, total",
    [
        # bf16, K=32: 31 entries of 1/16 and one 2^-10 smaller (all exact in bf16).
        (_row_with_sum([1 / 16] * 31 + [1 / 16 - 2**-10], torch.bfloat16, 32), 1.999),
        (_row_with_sum([2 / 512] * 512, torch.float16, 512), 2.0),
        (_row_with_sum([1.05 / 100_000] * 100_000, torch.float32, 100_000), 1.05),
    ],
    ids=["bf16-K32-sum1.999", "fp16-K512-sum2", "fp32-K1e5-sum1.05"],
)
def test_the_unnormalised_rows_of_issue_12_are_rejected(p, total):
    assert float(p.double().sum()) == pytest.approx(total, abs=1e-4)
    uniform = torch.full_like(p, 1.0 / p.shape[0])
    with pytest.raises(ValueError, match="categorical_kl: argument 'p' has rows.*tolerance"):
        categorical_kl(p, uniform)
    with pytest.raises(ValueError, match="entropy: argument 'p' has rows"):
        entropy(p)


def test_a_float32_softmax_cast_to_float64_is_accepted():
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(4, 512, generator=g), -1).double()
    q = torch.softmax(torch.randn(4, 512, generator=g), -1).double()
    # float32 rounding left |sum - 1| ~ 1e-7: far above float64's own rounding (K * 2.2e-16).
    assert float((p.sum(-1) - 1).abs().max()) > 1e-7
    assert torch.isfinite(categorical_kl(p, q)).all()
    assert torch.isfinite(entropy(p)).all()


def test_the_tolerance_is_documented_and_between_the_honest_and_the_wrong():
    # Honest rounding error reaches 2^-8 = 3.9e-3 (bf16); a 1% error can shrink to 6.1e-3
    # after bf16 rounding: the tolerance must lie strictly between, in every dtype.
    assert 2**-8 < PROBABILITY_TOLERANCE < 0.01 * (1 - 2**-8) - 2**-8
    nearly = torch.tensor([0.5, 0.5 + 1e-3], dtype=torch.float64)
    categorical_kl(nearly, nearly)  # 0.1% off: within rounding of a bf16 softmax
    off = torch.tensor([0.5, 0.5 + 1e-2], dtype=torch.float64)
    with pytest.raises(ValueError, match="tolerance 0.005"):
        categorical_kl(off, off)


def test_per_call_switch_and_global_switch_and_context_manager():
    bad = torch.tensor([0.7, 0.7])
    # Off for one call: the value is computed as written (no silent renormalisation).
    assert categorical_kl(bad, bad, validate=False).item() == 0.0
    assert math.isnan(gaussian_kl(torch.tensor([NAN]), torch.zeros(1), validate=False).item())
    with validation(False):
        assert not validation_enabled()
        categorical_kl(bad, bad)
        with pytest.raises(ValueError):
            categorical_kl(bad, bad, validate=True)  # the per-call argument wins
    assert validation_enabled()
    set_validation(False)
    entropy(bad)
    set_validation(True)
    with pytest.raises(ValueError):
        entropy(bad)
    with pytest.raises(ValueError, match="'enabled'"):
        set_validation("no")
    with pytest.raises(ValueError, match="'validate'"):
        entropy(UNIFORM, validate="yes")


def test_context_manager_restores_on_error():
    with pytest.raises(RuntimeError), validation(False):
        raise RuntimeError
    assert validation_enabled()


def test_shape_checks_stay_on_when_validation_is_off():
    with validation(False), pytest.raises(ValueError, match="do not broadcast"):
        gaussian_kl(torch.zeros(3), torch.zeros(4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_is_preserved(dtype):
    p = torch.full((3, 4), 0.25, dtype=dtype)
    assert gaussian_kl(p, p).dtype == dtype
    assert categorical_kl(p, p).dtype == dtype
    assert categorical_kl_from_logits(p, p).dtype == dtype
    assert entropy(p).dtype == dtype and cross_entropy(p, p).dtype == dtype
    assert bernoulli_nll(p, p).dtype == dtype
    assert gaussian_nll(p, p).dtype == dtype and laplace_nll(p, p, log_scale=-1.0).dtype == dtype


def test_device_is_preserved_on_meta_tensors():
    # The meta device stands in for any accelerator: no data, but shapes, dtypes and devices
    # propagate, which is what must not silently change.
    p = torch.empty(3, 4, device="meta")
    with validation(False):
        for out in (
            gaussian_kl(p, p, 0.0, 1.0),
            categorical_kl(p, p),
            categorical_kl_from_logits(p, p),
            entropy(p, unit="bits"),
            gaussian_nll(p, p, logvar=1.0),
            laplace_nll(p, p),
        ):
            assert out.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs_stay_on_cuda_and_validation_works_there():
    p = UNIFORM.cuda()
    assert categorical_kl(p, p).device.type == "cuda"
    assert gaussian_nll(p, p, logvar=torch.zeros(4, device="cuda")).device.type == "cuda"
    with pytest.raises(ValueError, match="'q' has negative"):
        categorical_kl(p, -p)


def test_finite_check_survives_overflowing_sums_and_names_the_right_argument():
    # The fast path sums each tensor; a sum that overflows must fall back to the exact check.
    huge = torch.full((10,), 3e38)
    assert torch.isinf(huge.sum())
    # Accepted (every input is finite); the true KL, 4.5e76, overflows float32 to inf.
    assert torch.isinf(gaussian_kl(huge, torch.zeros(10), validate=True)).all()
    with pytest.raises(ValueError, match="'logvar' contains 0 NaN and 1 Inf"):
        gaussian_kl(huge, torch.tensor([0.0] * 9 + [-INF]))


# --------------------------------------------------------------------------------------------
# Complex tensors are refused; mixed real dtypes are promoted
# --------------------------------------------------------------------------------------------

C = torch.full((2, 4), 0.25, dtype=torch.complex64)
R = UNIFORM
EYE = torch.eye(4)


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize(
    "call, fn, name",
    [
        (lambda v: gaussian_kl(C, R, validate=v), "gaussian_kl", "mu"),
        (lambda v: gaussian_kl(R, C, validate=v), "gaussian_kl", "logvar"),
        (lambda v: gaussian_kl(R, R, 0.0, C, validate=v), "gaussian_kl", "prior_logvar"),
        (
            lambda v: full_gaussian_kl(R, EYE, R, EYE.cfloat(), validate=v),
            "full_gaussian_kl",
            "scale_tril_p",
        ),
        (lambda v: categorical_kl(C, R, validate=v), "categorical_kl", "p"),
        (lambda v: categorical_kl(R, C, validate=v), "categorical_kl", "q"),
        (
            lambda v: categorical_kl_from_logits(R, C, validate=v),
            "categorical_kl_from_logits",
            "q_logits",
        ),
        (lambda v: entropy(C, validate=v), "entropy", "p"),
        (lambda v: cross_entropy(R, C, validate=v), "cross_entropy", "q"),
        (lambda v: mc_kl(C, R, validate=v), "mc_kl", "log_q"),
        (lambda v: KLDivergence(validate=v)(predicted=R, target=C), "KLDivergence", "target"),
        (
            lambda v: KLDivergence(from_logits=True, validate=v)(predicted=C, target=R),
            "KLDivergence",
            "predicted",
        ),
        (
            lambda v: KLDivergence(from_logits=True, target_from_logits=True, validate=v)(
                predicted=R, target=C
            ),
            "KLDivergence",
            "target",
        ),
        (
            lambda v: KLDivergence(target_from_logits=True, validate=v)(
                predicted=C.to(torch.complex128), target=R
            ),
            "KLDivergence",
            "predicted",
        ),
        (lambda v: bernoulli_nll(C, R, validate=v), "bernoulli_nll", "logits"),
        (lambda v: gaussian_nll(R, C, validate=v), "gaussian_nll", "target"),
        (lambda v: laplace_nll(R, R, log_scale=C, validate=v), "laplace_nll", "log_scale"),
    ],
)
def test_complex_tensors_are_refused_naming_the_argument(call, fn, name, validate):
    # Was a NotImplementedError from deep inside a kernel ("min_all" not implemented for
    # 'ComplexFloat'), or, with validation off, a result computed from complex numbers.
    # A shape-level check: always on.
    with pytest.raises(
        ValueError,
        match=rf"^{fn}: argument '{name}' must be a real floating-point tensor, got "
        r"torch\.complex(64|128); pass its real part \(\.real\) or its magnitude",
    ):
        call(validate)


def _promoted_is_equal(call, *args):
    """call(*args) equals call on args all promoted to their common dtype, value and dtype."""
    dtype = args[0].dtype
    for a in args[1:]:
        dtype = torch.promote_types(dtype, a.dtype)
    mixed, promoted = call(*args), call(*(a.to(dtype) for a in args))
    assert mixed.dtype == dtype
    assert torch.equal(mixed, promoted), (mixed - promoted).abs().max()


@pytest.mark.parametrize(
    "narrow, wide",
    [
        (torch.float32, torch.float64),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float64),
    ],
)
def test_gaussian_kl_of_mixed_dtypes_is_computed_in_the_common_dtype(narrow, wide):
    # Was: mu**2 rounded in mu's float32 and the variance term in logvar's float64, one KL in
    # two precisions; a Python-number prior took mu's dtype (0.1 rounded to float16).
    g = torch.Generator().manual_seed(14)
    mu = (torch.randn(256, 8, generator=g, dtype=torch.float64) * 3).to(narrow)
    logvar = torch.randn(256, 8, generator=g, dtype=torch.float64).to(wide)
    prior_mu = torch.randn(8, generator=g, dtype=torch.float64).to(narrow)
    _promoted_is_equal(gaussian_kl, mu, logvar)
    _promoted_is_equal(gaussian_kl, logvar, mu)
    _promoted_is_equal(lambda m, v: gaussian_kl(m, v, 0.1, -0.3), mu, logvar)
    _promoted_is_equal(lambda m, v, pm: gaussian_kl(m, v, pm, 0.7), mu, logvar, prior_mu)
    _promoted_is_equal(lambda m, v, pm: gaussian_kl(m, m, pm, v), mu, logvar, prior_mu)
    # Equal values in two dtypes: the KL of a distribution against itself is exactly 0.
    assert (gaussian_kl(mu, logvar.to(narrow), mu.to(wide), logvar.to(narrow).to(wide)) == 0).all()
    # Gradients come back in each argument's own dtype.
    mu, logvar = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
    gaussian_kl(mu, logvar).sum().backward()
    assert mu.grad.dtype == narrow and logvar.grad.dtype == wide


def test_a_python_number_prior_takes_the_common_dtype_without_widening_it():
    mu, logvar = torch.zeros(3, dtype=torch.float16), torch.zeros(3, dtype=torch.bfloat16)
    out = gaussian_kl(mu, logvar, 0.1, 0.0)
    assert out.dtype == torch.float32  # float16 with bfloat16 promotes to float32
    expected = 0.5 * torch.tensor(0.1, dtype=torch.float32).square()
    assert torch.equal(out, expected.expand(3))


def test_full_gaussian_kl_and_mc_kl_of_mixed_dtypes_are_computed_in_the_common_dtype():
    g = torch.Generator().manual_seed(15)
    a = torch.randn(6, 3, 3, generator=g, dtype=torch.float64)
    tril_q = (a.tril(-1) + torch.diag_embed(a.diagonal(dim1=-2, dim2=-1).exp())).float()
    b = torch.randn(6, 3, 3, generator=g, dtype=torch.float64)
    tril_p = b.tril(-1) + torch.diag_embed(b.diagonal(dim1=-2, dim2=-1).exp())
    mu_q = torch.randn(6, 3, generator=g)
    mu_p = torch.randn(6, 3, generator=g, dtype=torch.float64)
    _promoted_is_equal(full_gaussian_kl, mu_q, tril_q, mu_p, tril_p)
    _promoted_is_equal(full_gaussian_kl, mu_p, tril_p, mu_q, tril_q)
    # KL of a distribution against itself held in a wider dtype: exactly 0 up to the
    # triangular solve's rounding (L^-1 L is not exactly I in floating point).
    assert full_gaussian_kl(mu_q, tril_q, mu_q.double(), tril_q.double()).abs().max() < 1e-12
    log_q = torch.randn(16, 4, generator=g)
    log_p = torch.randn(16, 4, generator=g, dtype=torch.float64)
    for x, y in ((log_q, log_p), (log_p, log_q)):
        mixed, promoted = mc_kl(x, y), mc_kl(x.double(), y.double())
        assert mixed.estimate.dtype == torch.float64
        assert torch.equal(mixed.estimate, promoted.estimate)
        assert torch.equal(mixed.standard_error, promoted.standard_error)
