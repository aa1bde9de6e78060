"""Exact KL divergences, entropies and a Monte-Carlo KL estimator, in nats (or bits).

Every function computes one formula, written in its docstring. Edge cases of the discrete
divergences follow the conventions of information theory exactly, with no epsilon:

* 0 * log(0 / q) = 0 for any q, including q = 0;
* p * log(p / 0) = +inf for p > 0 (support mismatch: the true KL is infinite).

Elementwise results keep the (broadcast) shape of the inputs; reduce them yourself following
the project's units (sum over latent dimensions, mean over the batch).

Inputs of different floating-point dtypes are promoted to their common dtype
(:func:`torch.promote_types`: float32 with float64 computes in float64) *before* any
logarithm, so equal values give exactly KL = 0 whatever their dtypes, and the result has the
common dtype. Complex tensors and distributions over 0 outcomes are refused with a
``ValueError`` naming the argument.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vae.losses.deprecation import old_spellings
from vae.losses.validation import (
    broadcast_shape,
    check_all_finite,
    check_logits,
    check_probabilities,
    common_dtype,
    in_unit,
    normalise_event_dim,
    promote,
    require_tensor,
    should_validate,
)

__all__ = [
    "gaussian_kl",
    "full_gaussian_kl",
    "categorical_kl",
    "categorical_kl_from_logits",
    "entropy",
    "cross_entropy",
    "mc_kl",
    "MonteCarloKL",
    "KLDivergence",
]

# --------------------------------------------------------------------------------------------
# Gaussian
# --------------------------------------------------------------------------------------------


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def gaussian_kl(
    mu: Tensor,
    logvar: Tensor,
    prior_mu: Tensor | float | None = None,
    prior_logvar: Tensor | float | None = None,
    *,
    unit: str = "nats",
    validate: bool | None = None,
) -> Tensor:
    r"""Elementwise KL( N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar)) ) in nats.

    With d = logvar - prior_logvar::

        KL = 0.5 * ( (e^d - 1 - d)  +  (mu - prior_mu)**2 * exp(-prior_logvar) )

    which equals the textbook 0.5 * (sigma_q^2/sigma_p^2 - 1 - log(sigma_q^2/sigma_p^2)
    + (mu_q - mu_p)^2 / sigma_p^2). The prior defaults to N(0, 1) (prior_mu = 0,
    prior_logvar = 0).

    Why expm1: the variance term e^d - 1 - d is ~d^2/2 near the prior, and the textbook
    ``exp(d) - 1 - d`` (or torch.distributions' ``r - 1 - log r``) cancels catastrophically
    there: its error is ~eps whatever d is, so it can return 0 or a negative KL in float32.
    ``expm1(d) - d`` rounds only in the final subtraction (error ~eps * |d|), so the result is
    >= 0 in every dtype and exactly 0 at the prior. It is finite with finite gradients for
    logvar in [-30, 30] in float32 (exp(30) = 1.1e13); the gradients are
    dKL/dmu = (mu - prior_mu) * exp(-prior_logvar) and dKL/dlogvar = 0.5 * expm1(d).

    Args:
        mu, logvar: posterior mean and log-variance (natural log), any broadcastable shapes.
        prior_mu, prior_logvar: prior parameters, tensors or Python numbers; None means 0.
            Tensors of different dtypes are promoted to their common dtype; a Python number
            takes the tensors' common dtype and does not widen it (as in torch arithmetic).
        unit: "nats" or "bits".
        validate: check for NaN/Inf (None: use the global switch, see
            :mod:`vae.losses.validation`).

    Returns:
        The elementwise KL in ``unit``, with the broadcast shape of all inputs. Sum it over the
        latent dimensions to get the KL per example.
    """
    fn = "gaussian_kl"
    given = {"mu": mu, "logvar": logvar, "prior_mu": prior_mu, "prior_logvar": prior_logvar}
    given = {name: value for name, value in given.items() if value is not None}
    numbers = {
        name for name, value in given.items() if name.startswith("prior_") and _is_number(value)
    }
    for name, value in given.items():
        if name not in numbers:
            require_tensor(fn, name, value)
    # Promote before any arithmetic: mu**2 rounded in float32 and logvar's terms in float64
    # would mix two precisions in one KL.
    dtype = common_dtype(*(value for name, value in given.items() if name not in numbers))
    tensors = {
        name: (
            torch.tensor(float(value), dtype=dtype, device=mu.device)
            if name in numbers
            else value.to(dtype)
        )
        for name, value in given.items()
    }
    broadcast_shape(fn, **tensors)
    if should_validate(validate):
        check_all_finite(fn, **tensors)
    mu, logvar = tensors["mu"], tensors["logvar"]
    prior_mu, prior_logvar = tensors.get("prior_mu"), tensors.get("prior_logvar")

    log_ratio = logvar if prior_logvar is None else logvar - prior_logvar
    diff = mu if prior_mu is None else mu - prior_mu
    mean_term = diff.square() if prior_logvar is None else diff.square() * torch.exp(-prior_logvar)
    variance_term = torch.expm1(log_ratio) - log_ratio
    # Rounding guard, not a change of the maths (e^d - 1 - d >= 0 for every real d): an expm1
    # that rounds 1 ulp low at tiny |d| would make the difference negative. It acts on the data
    # only, because clamp_min in the graph zeroes the second derivative at d = 0, where it is 1;
    # nothing has saved variance_term for backward, so the in-place write is safe.
    variance_term.detach().clamp_min_(0)
    return in_unit(fn, 0.5 * (variance_term + mean_term), unit)


def full_gaussian_kl(
    mu_q: Tensor,
    scale_tril_q: Tensor,
    mu_p: Tensor,
    scale_tril_p: Tensor,
    *,
    unit: str = "nats",
    validate: bool | None = None,
) -> Tensor:
    r"""KL( N(mu_q, L_q L_q^T) || N(mu_p, L_p L_p^T) ) per batch element, in nats.

    ::

        KL = 0.5 * ( ||L_p^{-1} L_q||_F^2 + ||L_p^{-1} (mu_p - mu_q)||^2 - k
                     + 2 * sum(log diag L_p) - 2 * sum(log diag L_q) )

    The first two terms are tr(Sigma_p^{-1} Sigma_q) and the Mahalanobis distance, computed
    with triangular solves against L_p (never an explicit inverse, which loses accuracy and
    costs more); the log-determinants come from the Cholesky diagonals.

    Args:
        mu_q, mu_p: means, shape (..., k).
        scale_tril_q, scale_tril_p: lower-triangular Cholesky factors with a positive
            diagonal, shape (..., k, k). Only the lower triangle is read.
        unit: "nats" or "bits".
        validate: check for NaN/Inf and positive diagonals.

    Returns:
        KL in ``unit``, shape = broadcast of the batch shapes (...).
    """
    fn = "full_gaussian_kl"
    args = {"mu_q": mu_q, "scale_tril_q": scale_tril_q, "mu_p": mu_p, "scale_tril_p": scale_tril_p}
    for name, t in args.items():
        require_tensor(fn, name, t)
    for name in ("mu_q", "mu_p"):
        if args[name].dim() < 1:
            raise ValueError(f"{fn}: argument '{name}' must have shape (..., k), got a scalar")
    k = mu_q.shape[-1]
    for name in ("scale_tril_q", "scale_tril_p"):
        t = args[name]
        if t.dim() < 2 or t.shape[-2:] != (k, k):
            raise ValueError(
                f"{fn}: argument '{name}' must have shape (..., {k}, {k}) to match mu_q's "
                f"event size {k}, got {tuple(t.shape)}"
            )
    if mu_p.shape[-1] != k:
        raise ValueError(f"{fn}: argument 'mu_p' has event size {mu_p.shape[-1]} but mu_q has {k}")
    broadcast_shape(
        fn,
        mu_q=mu_q[..., 0],
        mu_p=mu_p[..., 0],
        scale_tril_q=scale_tril_q[..., 0, 0],
        scale_tril_p=scale_tril_p[..., 0, 0],
    )
    mu_q, scale_tril_q, mu_p, scale_tril_p = promote(mu_q, scale_tril_q, mu_p, scale_tril_p)
    scale_tril_q = scale_tril_q.tril()
    scale_tril_p = scale_tril_p.tril()
    diag_q = scale_tril_q.diagonal(dim1=-2, dim2=-1)
    diag_p = scale_tril_p.diagonal(dim1=-2, dim2=-1)
    if should_validate(validate):
        check_all_finite(fn, **args)
        for name, diag in (("scale_tril_q", diag_q), ("scale_tril_p", diag_p)):
            if bool((diag <= 0).any()):
                raise ValueError(
                    f"{fn}: argument '{name}' has a diagonal entry <= 0 (min "
                    f"{float(diag.min()):.4g}); a Cholesky factor needs a positive diagonal"
                )

    batch = torch.broadcast_shapes(scale_tril_p.shape[:-2], scale_tril_q.shape[:-2])
    lp = scale_tril_p.expand(*batch, k, k)
    whitened_q = torch.linalg.solve_triangular(lp, scale_tril_q.expand(*batch, k, k), upper=False)
    trace_term = whitened_q.square().sum((-2, -1))

    delta = mu_p - mu_q
    batch_m = torch.broadcast_shapes(batch, delta.shape[:-1])
    whitened_delta = torch.linalg.solve_triangular(
        scale_tril_p.expand(*batch_m, k, k), delta.expand(*batch_m, k).unsqueeze(-1), upper=False
    ).squeeze(-1)
    mahalanobis = whitened_delta.square().sum(-1)

    log_det_ratio = 2.0 * (diag_p.log().sum(-1) - diag_q.log().sum(-1))
    return in_unit(fn, 0.5 * (trace_term + mahalanobis - k + log_det_ratio), unit)


# --------------------------------------------------------------------------------------------
# Categorical
# --------------------------------------------------------------------------------------------


def _p_log_ratio(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """p * (log p - log q) from log-probabilities (log_softmax output), 0 wherever p == 0.

    torch.where selects values *and* gradients, so the p == 0 entries get a zero gradient;
    log_softmax's backward stays finite even at log q = -inf, so no NaN can enter.
    """
    positive = p > 0
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    safe_log_q = torch.where(positive, log_q, zero)  # -inf - -inf would be NaN
    safe_log_p = torch.where(positive, log_p, zero)
    return torch.where(positive, p * (safe_log_p - safe_log_q), zero)


def _p_log_ratio_from_probabilities(p: Tensor, q: Tensor, *, with_log_p: bool = True) -> Tensor:
    """p * (log p - log q) from probabilities (p * (0 - log q) if not ``with_log_p``).

    Where p == 0 the logarithms are taken of 1 instead of p and q: a log(0) there would put
    the infinite derivative 1/0 into the graph, and 0 * inf = NaN in the backward pass even
    though torch.where discards the value. Where q == 0 < p the term is +inf, as it must be.
    """
    positive = p > 0
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    one = torch.ones((), dtype=p.dtype, device=p.device)
    log_q = torch.where(positive, q, one).log()
    log_p = torch.where(positive, p, one).log() if with_log_p else zero
    return torch.where(positive, p * (log_p - log_q), zero)


def _event_dim(fn: str, dim: int, shape: torch.Size, **tensors: Tensor) -> int:
    """:func:`normalise_event_dim`, and an error for an event size of 0.

    A row of 0 probabilities sums to 0, not 1: no distribution has no outcomes, so such a
    row is an error (a shape check, always on) rather than a silent KL or entropy of 0.
    An empty *batch* of distributions, shape (0, K), is fine: elementwise in, elementwise out.
    """
    event_dim = normalise_event_dim(fn, dim, shape, **tensors)
    if shape[event_dim] == 0:
        name = next(iter(tensors))
        raise ValueError(
            f"{fn}: argument '{name}' has event size 0 along dim={dim} (shape "
            f"{tuple(tensors[name].shape)}); a distribution needs at least one outcome"
        )
    return event_dim


def _check_pair(
    fn: str, p: Tensor, q: Tensor, dim: int, validate: bool | None, names: tuple[str, str]
) -> tuple[int, Tensor, Tensor]:
    """Check two probability tensors; return the event dim and both, broadcast and promoted."""
    p_name, q_name = names
    require_tensor(fn, p_name, p)
    require_tensor(fn, q_name, q)
    shape = broadcast_shape(fn, **{p_name: p, q_name: q})
    event_dim = _event_dim(fn, dim, shape, **{p_name: p, q_name: q})
    if should_validate(validate):
        check_probabilities(fn, p_name, p, event_dim)
        check_probabilities(fn, q_name, q, event_dim)
    p, q = torch.broadcast_tensors(*promote(p, q))
    return event_dim, p, q


def _categorical_kl(
    p: Tensor, q: Tensor, dim: int, validate: bool | None, fn: str, names: tuple[str, str]
) -> Tensor:
    event_dim, p, q = _check_pair(fn, p, q, dim, validate, names)
    return _p_log_ratio_from_probabilities(p, q).sum(event_dim)


def _categorical_kl_from_logits(
    p_logits: Tensor,
    q_logits: Tensor,
    dim: int,
    validate: bool | None,
    fn: str,
    names: tuple[str, str],
) -> Tensor:
    p_name, q_name = names
    require_tensor(fn, p_name, p_logits)
    require_tensor(fn, q_name, q_logits)
    shape = broadcast_shape(fn, **{p_name: p_logits, q_name: q_logits})
    event_dim = _event_dim(fn, dim, shape, **{p_name: p_logits, q_name: q_logits})
    if should_validate(validate):
        check_logits(fn, p_name, p_logits, event_dim)
        check_logits(fn, q_name, q_logits, event_dim)
    p_logits, q_logits = promote(p_logits, q_logits)
    log_p = F.log_softmax(p_logits, dim=event_dim)
    log_q = F.log_softmax(q_logits, dim=event_dim)
    log_p, log_q = torch.broadcast_tensors(log_p, log_q)
    return _p_log_ratio(log_p.exp(), log_p, log_q).sum(event_dim)


def _categorical_kl_mixed(
    target: Tensor,
    predicted: Tensor,
    dim: int,
    validate: bool | None,
    fn: str,
    names: tuple[str, str],
    *,
    target_from_logits: bool,
) -> Tensor:
    """KL(p || q) with one side probabilities and the other logits.

    Target probabilities p, predicted logits l (label smoothing, one-hot targets)::

        KL = sum_i p_i * (log p_i - log_softmax(l)_i)

    Target logits t, predicted probabilities q: sum_i softmax(t)_i * (log_softmax(t)_i - log q_i).
    Same conventions as :func:`categorical_kl`: 0 where p_i = 0 (also against l_i = -inf or
    q_i = 0), +inf where p_i > 0 meets q_i = 0 (l_i = -inf), finite gradients wherever the
    value is finite.
    """
    target_name, predicted_name = names
    require_tensor(fn, target_name, target)
    require_tensor(fn, predicted_name, predicted)
    shape = broadcast_shape(fn, **{target_name: target, predicted_name: predicted})
    event_dim = _event_dim(fn, dim, shape, **{target_name: target, predicted_name: predicted})
    if should_validate(validate):
        if target_from_logits:
            check_logits(fn, target_name, target, event_dim)
            check_probabilities(fn, predicted_name, predicted, event_dim)
        else:
            check_probabilities(fn, target_name, target, event_dim)
            check_logits(fn, predicted_name, predicted, event_dim)
    target, predicted = promote(target, predicted)
    if target_from_logits:
        log_p = F.log_softmax(target, dim=event_dim)
        p = log_p.exp()
        # log q only where p > 0: elsewhere log(1) = 0 keeps 1/q out of the backward pass.
        one = torch.ones((), dtype=predicted.dtype, device=predicted.device)
        log_q = torch.where(p > 0, predicted, one).log()
    else:
        p = target
        one = torch.ones((), dtype=p.dtype, device=p.device)
        log_p = torch.where(p > 0, p, one).log()  # log 0 would put 1/0 into the graph
        log_q = F.log_softmax(predicted, dim=event_dim)
    p, log_p, log_q = torch.broadcast_tensors(p, log_p, log_q)
    return _p_log_ratio(p, log_p, log_q).sum(event_dim)


def categorical_kl(
    p: Tensor, q: Tensor, dim: int = -1, *, unit: str = "nats", validate: bool | None = None
) -> Tensor:
    r"""KL(p || q) = sum_i p_i * log(p_i / q_i) over ``dim``, from probabilities, in nats.

    Conventions (exact, no epsilon): terms with p_i = 0 are 0, whatever q_i is; a term with
    q_i = 0 < p_i is +inf, so the result is +inf when p puts mass where q has none. Gradients
    are finite wherever the value is finite.

    Args:
        p, q: probabilities along ``dim``; other dimensions broadcast. Must be non-negative and
            sum to 1 along ``dim`` (checked unless validation is off).
        dim: the event dimension.
        unit: "nats" or "bits".

    Returns:
        KL in ``unit``, with ``dim`` removed from the broadcast shape.
    """
    fn = "categorical_kl"
    return in_unit(fn, _categorical_kl(p, q, dim, validate, fn, ("p", "q")), unit)


def categorical_kl_from_logits(
    p_logits: Tensor,
    q_logits: Tensor,
    dim: int = -1,
    *,
    unit: str = "nats",
    validate: bool | None = None,
) -> Tensor:
    r"""KL( softmax(p_logits) || softmax(q_logits) ) over ``dim``, in nats.

    Computed as sum_i p_i * (log_softmax(p_logits)_i - log_softmax(q_logits)_i), which is
    finite for arbitrarily large finite logits (e.g. 1e4) where softmax-then-log would
    underflow to log 0. A logit of -inf means probability 0 and follows the same conventions
    as :func:`categorical_kl` (0 where p_i = 0, +inf where q_i = 0 < p_i). ``unit``: "nats"
    or "bits".
    """
    fn = "categorical_kl_from_logits"
    kl = _categorical_kl_from_logits(
        p_logits, q_logits, dim, validate, fn, ("p_logits", "q_logits")
    )
    return in_unit(fn, kl, unit)


def entropy(
    p: Tensor, dim: int = -1, *, unit: str = "nats", validate: bool | None = None
) -> Tensor:
    r"""Shannon entropy H(p) = -sum_i p_i * log p_i over ``dim``, with 0 log 0 = 0.

    Args:
        p: probabilities along ``dim``.
        unit: "nats" (natural log, the project's unit) or "bits" (log base 2 = nats / ln 2).

    Returns:
        Entropy with ``dim`` removed.
    """
    fn = "entropy"
    require_tensor(fn, "p", p)
    event_dim = _event_dim(fn, dim, p.shape, p=p)
    if should_validate(validate):
        check_probabilities(fn, "p", p, event_dim)
    # H(p) = -sum p log p = sum p * (0 - log p)
    h = _p_log_ratio_from_probabilities(p, p, with_log_p=False).sum(event_dim)
    return in_unit(fn, h, unit)


def cross_entropy(
    p: Tensor, q: Tensor, dim: int = -1, *, unit: str = "nats", validate: bool | None = None
) -> Tensor:
    r"""Cross-entropy H(p, q) = -sum_i p_i * log q_i over ``dim``, from probabilities.

    Terms with p_i = 0 are 0; a term with q_i = 0 < p_i is +inf. H(p, q) = H(p) + KL(p || q).
    Note the argument order: ``p`` is the target (data) distribution, ``q`` the model. This is
    *not* :func:`torch.nn.functional.cross_entropy`, which takes logits and class labels.

    Args:
        p, q: probabilities along ``dim``; other dimensions broadcast.
        unit: "nats" or "bits".
    """
    fn = "cross_entropy"
    event_dim, p, q = _check_pair(fn, p, q, dim, validate, ("p", "q"))
    # -sum p log q = sum p * (0 - log q), with the same p == 0 / q == 0 conventions as the KL.
    h = _p_log_ratio_from_probabilities(p, q, with_log_p=False).sum(event_dim)
    return in_unit(fn, h, unit)


# --------------------------------------------------------------------------------------------
# Monte Carlo
# --------------------------------------------------------------------------------------------


class MonteCarloKL(NamedTuple):
    """A Monte-Carlo KL estimate with its standard error (both in the unit asked of mc_kl)."""

    estimate: Tensor
    standard_error: Tensor


def mc_kl(
    log_q: Tensor,
    log_p: Tensor,
    dim: int = 0,
    *,
    unit: str = "nats",
    validate: bool | None = None,
) -> MonteCarloKL:
    r"""Monte-Carlo estimate of KL(q || p) from samples z_s ~ q, s = 1..S.

    ::

        estimate       = (1/S) * sum_s [log q(z_s) - log p(z_s)]
        standard_error = std_s[log q(z_s) - log p(z_s)] / sqrt(S)     (std with S - 1)

    The estimate is unbiased for KL(q || p) whenever the z_s are drawn from q (reparameterised
    samples give unbiased gradients too). Use it when q or p has no closed-form KL, e.g. a
    mixture or flow prior. An interval of +-4 standard errors around the estimate contains the
    true KL with overwhelming probability for moderate S (central limit theorem).

    Args:
        log_q: log q(z_s) in nats, samples along ``dim``; other dims index independent KLs
            (e.g. batch).
        log_p: log p(z_s) at the same samples, broadcastable with ``log_q``.
        dim: the sample dimension (needs S >= 2 for a standard error).
        unit: "nats" or "bits" (of both results).

    Returns:
        ``MonteCarloKL(estimate, standard_error)``, each with ``dim`` removed.
    """
    fn = "mc_kl"
    require_tensor(fn, "log_q", log_q)
    require_tensor(fn, "log_p", log_p)
    shape = broadcast_shape(fn, log_q=log_q, log_p=log_p)
    sample_dim = normalise_event_dim(fn, dim, shape, log_q=log_q, log_p=log_p)
    num_samples = shape[sample_dim]
    if num_samples < 2:
        raise ValueError(
            f"{fn}: need at least 2 samples along dim={dim} for a standard error, got {num_samples}"
        )
    if should_validate(validate):
        check_all_finite(fn, log_q=log_q, log_p=log_p)
    log_ratio = log_q - log_p
    std, mean = torch.std_mean(log_ratio, dim=sample_dim, correction=1)
    return MonteCarloKL(in_unit(fn, mean, unit), in_unit(fn, std / math.sqrt(num_samples), unit))


# --------------------------------------------------------------------------------------------
# nn.Module loss
# --------------------------------------------------------------------------------------------

_REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _empty_argument(target: Tensor, predicted: Tensor) -> tuple[str, Tensor]:
    """The argument that made a broadcast shape empty (broadcasting only yields a 0 from a 0)."""
    return ("target", target) if target.numel() == 0 else ("predicted", predicted)


class KLDivergence(nn.Module):
    r"""KL(target || predicted) as an ``nn.Module`` loss, for distillation and label smoothing.

    **Arguments, by keyword only:** ``loss(predicted=..., target=...)`` computes
    KL(target || predicted) = sum_i target_i * log(target_i / predicted_i), the expectation
    under the target (data, teacher), the direction of :class:`torch.nn.KLDivLoss`. The order
    is torch's for losses, prediction then target (the package's rule 1), and the tensors are
    keyword-only because in version 0.1 they were positional in the other order,
    ``loss(target, predicted)``: a positional call is refused with a TypeError rather than
    read one way or the other. Unlike :func:`torch.nn.functional.kl_div`, the prediction is
    not a *log*-probability, and ``reduction="mean"`` averages over distributions, not over
    elements (classes included). Always in nats: it is a training objective (rule 3).

    **Which argument is logits:** ``from_logits`` is about the *prediction* only (as in Keras'
    losses); the target has its own switch, ``target_from_logits`` (like ``log_target`` of
    :func:`torch.nn.functional.kl_div`). Logits are normalised with log_softmax over ``dim``;
    probabilities must be >= 0 and sum to 1 along ``dim`` (see
    :data:`vae.losses.validation.PROBABILITY_TOLERANCE`).

    Label smoothing, or one-hot targets, against a model that outputs logits::

        smooth = F.one_hot(labels, K).float() * (1 - eps) + eps / K   # probabilities
        loss = KLDivergence(from_logits=True)(predicted=logits, target=smooth)
        # = F.cross_entropy(logits, labels, label_smoothing=eps) - entropy(smooth).mean():
        # the same gradients, and 0 at the optimum (eps = 0: exactly F.cross_entropy).

    Distillation from a teacher's logits (Hinton et al. 2015). The temperature T is the
    caller's job: divide both logits by T and, to keep the gradient scale independent of T,
    multiply the loss by T**2::

        distill = KLDivergence(from_logits=True, target_from_logits=True)
        loss = distill(predicted=student_logits / T, target=teacher_logits / T) * T**2

    Exact edge cases, no epsilon anywhere: a target probability of 0 contributes 0 (whatever
    the prediction, even probability 0 / logit -inf); a target probability > 0 where the
    predicted probability is 0 (logit -inf) gives +inf. Gradients are finite wherever the
    value is.

    Args:
        reduction: how to reduce the per-distribution KL (``dim`` already summed out):
            ``"batchmean"`` sum / size of the first (batch) dimension, i.e. nats per example;
            ``"sum"`` total; ``"mean"`` mean over all distributions (e.g. over batch *and*
            time steps); ``"none"`` the per-distribution KL, shape = input shape minus ``dim``.
            Empty inputs: ``"batchmean"`` of an empty batch (shape (0, ..., K)) and
            ``"mean"`` of no distributions at all are 0 / 0, so they raise a ValueError
            instead of returning NaN; ``"sum"`` of nothing is 0 and ``"none"`` returns the
            empty per-distribution tensor, both well defined. (``"batchmean"`` of B > 0
            examples with no distributions each, e.g. shape (B, 0, K), is 0.) A distribution
            over K = 0 outcomes is always an error.
        from_logits: if True, ``predicted`` is unnormalised logits; if False, probabilities.
        dim: the event (class) dimension.
        target_from_logits: if True, ``target`` is unnormalised logits (a teacher's);
            if False (default), probabilities.
        validate: value checks on the inputs (None: the global switch).
    """

    def __init__(
        self,
        reduction: str = "batchmean",
        from_logits: bool = False,
        dim: int = -1,
        *,
        target_from_logits: bool = False,
        validate: bool | None = None,
    ):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(
                f"KLDivergence: argument 'reduction' must be one of {_REDUCTIONS}, "
                f"got {reduction!r}"
            )
        for name, flag in (
            ("from_logits", from_logits),
            ("target_from_logits", target_from_logits),
        ):
            if not isinstance(flag, bool):
                raise ValueError(
                    f"KLDivergence: argument '{name}' must be True or False, got {flag!r}"
                )
        self.reduction = reduction
        self.from_logits = from_logits
        self.target_from_logits = target_from_logits
        self.dim = dim
        self.validate = validate

    @old_spellings(
        "loss(predicted=..., target=...)",
        refuse_positional="the tensors are keyword-only: in version 0.1 they were positional "
        "in the order (target, predicted), torch's losses take (prediction, target), and a "
        "positional call is not guessed",
    )
    def forward(self, *, predicted: Tensor, target: Tensor) -> Tensor:
        """KL(target || predicted) in nats, reduced as configured."""
        fn, names = "KLDivergence", ("target", "predicted")
        if self.from_logits == self.target_from_logits:
            kl_fn = _categorical_kl_from_logits if self.from_logits else _categorical_kl
            kl = kl_fn(target, predicted, self.dim, self.validate, fn, names)
        else:
            kl = _categorical_kl_mixed(
                target,
                predicted,
                self.dim,
                self.validate,
                fn,
                names,
                target_from_logits=self.target_from_logits,
            )
        if self.reduction == "none":
            return kl
        if self.reduction == "sum":
            return kl.sum()  # an empty batch sums to 0
        if self.reduction == "mean":
            if kl.numel() == 0:
                name, empty = _empty_argument(target, predicted)
                raise ValueError(
                    f"KLDivergence: argument '{name}' holds no distributions (shape "
                    f"{tuple(empty.shape)}); reduction='mean' of nothing is undefined: pass at "
                    f"least one distribution, or use reduction='sum'"
                )
            return kl.mean()
        if kl.dim() == 0:
            return kl  # a single distribution: its own batch of one
        if kl.shape[0] == 0:
            name, empty = _empty_argument(target, predicted)
            raise ValueError(
                f"KLDivergence: argument '{name}' is an empty batch (shape "
                f"{tuple(empty.shape)}); pass at least one example"
            )
        return kl.sum() / kl.shape[0]

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction!r}, from_logits={self.from_logits}, "
            f"target_from_logits={self.target_from_logits}, dim={self.dim}"
        )
