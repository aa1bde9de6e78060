"""Input validation: every error is a ValueError naming the argument; the switch works."""

import math

import pytest
import torch

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
            lambda: KLDivergence()(UNIFORM, UNIFORM * 3),
            "KLDivergence: argument 'predicted' has rows",
        ),
        (
            lambda: KLDivergence(from_logits=True)(torch.full((2, 4), NAN), UNIFORM),
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
            lambda: gaussian_nll(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor(NAN)),
            "gaussian_nll: argument 'log_sigma' contains 1 NaN",
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


def test_row_sum_tolerance_scales_with_dtype():
    nearly = torch.tensor([0.5, 0.5 + 1e-6])
    categorical_kl(nearly, nearly)  # float32: 1e-6 is rounding-level, accepted
    with pytest.raises(ValueError, match="tolerance"):
        categorical_kl(nearly.double(), nearly.double())  # float64: 1e-6 is a real error
    categorical_kl(nearly.double() / nearly.double().sum(), nearly.double() / nearly.double().sum())


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
    assert gaussian_nll(p, p).dtype == dtype and laplace_nll(p, p, -1.0).dtype == dtype


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
            gaussian_nll(p, p, 0.5),
            laplace_nll(p, p),
        ):
            assert out.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs_stay_on_cuda_and_validation_works_there():
    p = UNIFORM.cuda()
    assert categorical_kl(p, p).device.type == "cuda"
    assert gaussian_nll(p, p, torch.zeros(4, device="cuda")).device.type == "cuda"
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
