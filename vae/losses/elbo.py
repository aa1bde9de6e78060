"""One ELBO, many regularisers.

:func:`compute_elbo` computes the reconstruction term, the KL, the per-dimension KL and the
ELBO once. What varies between beta-VAE, KL annealing, capacity and free bits is only the
*regulariser*: a small object that turns the (B, D) KL into the penalty added to the loss::

    loss = recon + penalty(KL, t)              (what the optimizer minimises)
    elbo = -(recon + KL)                        (what is reported; never changed by the variant)

All terms are in nats per example (summed over pixels / latent dims, averaged over the batch).

Regularisers follow one protocol: ``regulariser(kl, step) -> (penalty, beta)`` with ``kl`` of
shape (B, D) (elementwise KL per example and latent dim), ``penalty`` a scalar tensor and
``beta`` the KL weight as a float (logged as ``train/beta``); plus ``state_dict()`` /
``load_state_dict()`` so the schedule is checkpointed. An optional ``capacity(step)`` method
reports C(t).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch
from torch import Tensor

from vae.losses.schedules import (
    CapacitySchedule,
    ConstantBeta,
    CyclicalBeta,
    LinearWarmup,
    Schedule,
)
from vae.losses.validation import check_all_finite, require_int, require_number, should_validate

__all__ = [
    "ELBOTerms",
    "KLRegulariser",
    "BetaKL",
    "CapacityKL",
    "FreeBitsKL",
    "compute_elbo",
    "build_regulariser",
    "kl_regulariser",
    "REGULARISER_KINDS",
]


@dataclasses.dataclass
class ELBOTerms:
    """The terms of one ELBO evaluation, all in nats per example (batch means).

    Attributes:
        loss: scalar to minimise, recon + penalty.
        recon: mean over the batch of the per-example reconstruction NLL.
        kl: mean over the batch of the KL summed over latent dims.
        kl_per_dim: (D,) batch-mean KL of each latent dim; ``kl_per_dim.sum() == kl``.
        elbo: -(recon + kl), the evidence lower bound (independent of the regulariser).
        beta: the KL weight used at this step (for CapacityKL: gamma, the weight on |KL - C|).
        penalty: the regulariser actually added to recon in ``loss``.
        capacity: C(t) in nats for capacity regularisers, else None.
    """

    loss: Tensor
    recon: Tensor
    kl: Tensor
    kl_per_dim: Tensor
    elbo: Tensor
    beta: float
    penalty: Tensor
    capacity: float | None = None

    def scalars(self) -> dict[str, Tensor | float]:
        """The scalar terms by name (``loss``, ``recon``, ``kl``, ``elbo``, ``beta``,
        ``penalty`` and, if set, ``capacity``) for logging under a ``train/`` or ``val/``
        prefix. ``kl_per_dim`` is left out: log it as a histogram."""
        out: dict[str, Tensor | float] = {
            "loss": self.loss,
            "recon": self.recon,
            "kl": self.kl,
            "elbo": self.elbo,
            "beta": self.beta,
            "penalty": self.penalty,
        }
        if self.capacity is not None:
            out["capacity"] = self.capacity
        return out


class KLRegulariser(Protocol):
    def __call__(self, kl: Tensor, step: int) -> tuple[Tensor, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _as_schedule(owner: str, schedule: Schedule | float) -> Schedule:
    """Accept a schedule object or a plain number (meaning a constant beta)."""
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, (int, float)) and not isinstance(schedule, bool):
        return ConstantBeta(beta=schedule)
    raise ValueError(
        f"{owner}: argument 'schedule' must be a Schedule (e.g. LinearWarmup(...)) or a "
        f"number for a constant beta, got {type(schedule).__name__}"
    )


def _check_kl(owner: str, kl: Tensor) -> None:
    if not isinstance(kl, Tensor) or kl.dim() != 2:
        shape = tuple(kl.shape) if isinstance(kl, Tensor) else type(kl).__name__
        raise ValueError(
            f"{owner}: argument 'kl' must be the elementwise KL of shape (batch, latent_dims), "
            f"got {shape}"
        )
    if kl.shape[0] == 0:
        raise ValueError(
            f"{owner}: argument 'kl' is an empty batch (shape {tuple(kl.shape)}); the batch mean "
            f"of nothing is NaN: pass at least one example"
        )


class _ScheduledRegulariser:
    """state_dict plumbing shared by the regularisers: hyper-parameters + the schedule."""

    schedule: Schedule

    def _hyper_parameters(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": type(self).__name__,
            **self._hyper_parameters(),
            "schedule": self.schedule.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        name = type(self).__name__
        expected = {"kind", "schedule", *self._hyper_parameters()}
        if state.get("kind") != name or set(state) != expected:
            raise ValueError(
                f"{name}.load_state_dict: argument 'state' (kind {state.get('kind')!r}, keys "
                f"{sorted(state)}) does not match a {name} (keys {sorted(expected)})"
            )
        self.schedule.load_state_dict(state["schedule"])
        for key in self._hyper_parameters():
            setattr(self, key, state[key])

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._hyper_parameters().items())
        return f"{type(self).__name__}({args + ', ' if args else ''}schedule={self.schedule!r})"


class BetaKL(_ScheduledRegulariser):
    """penalty = beta(t) * KL, with KL the batch mean of the per-example KL.

    Covers the plain ELBO (constant beta = 1), the beta-VAE (Higgins et al. 2017; constant
    beta > 1), linear warm-up (Bowman et al. 2016) and cyclical annealing (Fu et al. 2019),
    depending on ``schedule``.

    Args:
        schedule: a :class:`~vae.losses.schedules.Schedule` giving beta(t), or a number for a
            constant beta.
    """

    def __init__(self, schedule: Schedule | float = 1.0):
        self.schedule = _as_schedule("BetaKL", schedule)

    def __call__(self, kl: Tensor, step: int) -> tuple[Tensor, float]:
        _check_kl("BetaKL", kl)
        beta = self.schedule(step)
        return beta * kl.sum(1).mean(), beta


class CapacityKL(_ScheduledRegulariser):
    """penalty = gamma * |KL - C(t)| (Burgess et al. 2018, "Understanding disentangling in
    beta-VAE").

    The KL is pulled towards a target capacity C(t) (nats per example) that grows linearly, so
    the latent code is allowed to carry more information as training goes on. The reported
    ``beta`` is gamma: the gradient weight on the KL is +gamma above C(t) and -gamma below it.

    Args:
        gamma: weight of the constraint (the paper uses ~1000 for images), >= 0.
        schedule: the capacity schedule C(t).
    """

    def __init__(self, gamma: float, schedule: CapacitySchedule):
        self.gamma = require_number("CapacityKL", "gamma", gamma)
        if not isinstance(schedule, CapacitySchedule):
            raise ValueError(
                f"CapacityKL: argument 'schedule' must be a CapacitySchedule(c_max=..., "
                f"steps=...), got {type(schedule).__name__}"
            )
        self.schedule = schedule

    def _hyper_parameters(self) -> dict[str, Any]:
        return {"gamma": self.gamma}

    def capacity(self, step: int) -> float:
        """C(t) in nats per example."""
        return self.schedule(step)

    def __call__(self, kl: Tensor, step: int) -> tuple[Tensor, float]:
        _check_kl("CapacityKL", kl)
        capacity = self.schedule(step)
        return self.gamma * (kl.sum(1).mean() - capacity).abs(), self.gamma


class FreeBitsKL(_ScheduledRegulariser):
    """Free bits (Kingma et al. 2016, "Improved variational inference with inverse
    autoregressive flow", eq. 15): penalty = beta(t) * sum_g max(lambda, KL_g).

    KL_g is the batch-mean KL summed over the latent dims of group g. A group whose KL is
    below lambda contributes the constant lambda, so its gradient is exactly 0: the encoder is
    not pushed to collapse that group towards the prior. Groups are contiguous, equally sized
    blocks of the flattened latent dims.

    Args:
        free_bits: lambda, the free KL per group, in **nats** (despite the name), >= 0.
        schedule: beta(t) (a Schedule or a number); default constant 1.
        groups: number of groups; None means one group per latent dim. Must divide D.
    """

    def __init__(
        self, free_bits: float, schedule: Schedule | float = 1.0, groups: int | None = None
    ):
        self.free_bits = require_number("FreeBitsKL", "free_bits", free_bits)
        self.schedule = _as_schedule("FreeBitsKL", schedule)
        self.groups = (
            None if groups is None else require_int("FreeBitsKL", "groups", groups, minimum=1)
        )

    def _hyper_parameters(self) -> dict[str, Any]:
        return {"free_bits": self.free_bits, "groups": self.groups}

    def __call__(self, kl: Tensor, step: int) -> tuple[Tensor, float]:
        _check_kl("FreeBitsKL", kl)
        kl_per_dim = kl.mean(0)
        if self.groups is None:
            kl_per_group = kl_per_dim
        else:
            num_dims = kl_per_dim.shape[0]
            if num_dims % self.groups:
                raise ValueError(
                    f"FreeBitsKL: argument 'groups'={self.groups} does not divide the "
                    f"{num_dims} latent dims; choose a divisor of {num_dims}"
                )
            kl_per_group = kl_per_dim.reshape(self.groups, -1).sum(1)
        # Strict '>' so that a group exactly at lambda also gets zero gradient (torch.maximum
        # would split the gradient 50/50 on ties).
        floor = torch.full_like(kl_per_group, self.free_bits)
        clamped = torch.where(kl_per_group > self.free_bits, kl_per_group, floor)
        beta = self.schedule(step)
        return beta * clamped.sum(), beta


def compute_elbo(
    recon_nll: Tensor,
    kl_elementwise: Tensor,
    regulariser: KLRegulariser | float = 1.0,
    step: int = 0,
    *,
    validate: bool | None = None,
) -> ELBOTerms:
    """Compute every ELBO term once and apply the regulariser to the KL.

    Args:
        recon_nll: per-example reconstruction NLL in nats, shape (B,) (e.g. from
            :func:`vae.losses.gaussian_nll`).
        kl_elementwise: elementwise KL, shape (B, D) or (B, *latent_shape) (e.g. from
            :func:`vae.losses.gaussian_kl`); latent dims are flattened.
        regulariser: a regulariser object (BetaKL, CapacityKL, FreeBitsKL or your own), or a
            number meaning a constant beta.
        step: optimizer step (Lightning's ``global_step``) for the schedules.
        validate: check both inputs for NaN/Inf (None: the global switch).

    Returns:
        :class:`ELBOTerms`.

    Raises:
        ValueError: on bad shapes, and on an empty batch (B = 0), whose batch means would be
            NaN; with validation on, on NaN/Inf inputs.
    """
    fn = "compute_elbo"
    if not isinstance(recon_nll, Tensor) or recon_nll.dim() != 1:
        shape = tuple(recon_nll.shape) if isinstance(recon_nll, Tensor) else type(recon_nll)
        raise ValueError(
            f"{fn}: argument 'recon_nll' must be the per-example NLL of shape (B,), got {shape}; "
            f"sum over pixels per example first"
        )
    if not isinstance(kl_elementwise, Tensor) or kl_elementwise.dim() < 2:
        shape = (
            tuple(kl_elementwise.shape)
            if isinstance(kl_elementwise, Tensor)
            else type(kl_elementwise)
        )
        raise ValueError(
            f"{fn}: argument 'kl_elementwise' must have shape (B, D) or (B, *latent_shape), "
            f"got {shape}"
        )
    if kl_elementwise.shape[0] != recon_nll.shape[0]:
        raise ValueError(
            f"{fn}: batch sizes differ: 'recon_nll' has {recon_nll.shape[0]} examples, "
            f"'kl_elementwise' has {kl_elementwise.shape[0]}"
        )
    if recon_nll.shape[0] == 0:
        # Every term is a batch mean, and the mean of nothing is NaN. A shape check, always on.
        raise ValueError(
            f"{fn}: argument 'recon_nll' is an empty batch (shape {tuple(recon_nll.shape)}); "
            f"pass at least one example"
        )
    if should_validate(validate):
        check_all_finite(fn, recon_nll=recon_nll, kl_elementwise=kl_elementwise)
    if isinstance(regulariser, (int, float)) and not isinstance(regulariser, bool):
        regulariser = BetaKL(regulariser)

    kl_flat = kl_elementwise.flatten(1)
    kl_per_dim = kl_flat.mean(0)
    kl = kl_per_dim.sum()
    recon = recon_nll.mean()
    penalty, beta = regulariser(kl_flat, step)
    capacity_at = getattr(regulariser, "capacity", None)
    return ELBOTerms(
        loss=recon + penalty,
        recon=recon,
        kl=kl,
        kl_per_dim=kl_per_dim,
        elbo=-(recon + kl),
        beta=float(beta),
        penalty=penalty,
        capacity=capacity_at(step) if callable(capacity_at) else None,
    )


REGULARISER_KINDS = ("constant", "linear", "cyclical", "capacity", "free_bits")


def build_regulariser(kind: str, **kwargs: Any) -> KLRegulariser:
    """Build a regulariser from config-style arguments.

    ============  ===========================================  ====================================
    kind          keyword arguments                             result
    ============  ===========================================  ====================================
    constant      beta                                          BetaKL(ConstantBeta(beta))
    linear        beta, warmup_steps, start                     BetaKL(LinearWarmup(...))
    cyclical      beta, cycle_steps, ratio, start, num_cycles   BetaKL(CyclicalBeta(...))
    capacity      gamma, c_max, steps                           CapacityKL(gamma, CapacitySchedule)
    free_bits     free_bits, groups, beta                       FreeBitsKL(free_bits, beta, groups)
    ============  ===========================================  ====================================

    The classes can also be built directly (e.g. by Hydra ``_target_``).
    """
    builders = {
        "constant": lambda beta=1.0: BetaKL(ConstantBeta(beta=beta)),
        "linear": lambda **kw: BetaKL(LinearWarmup(**kw)),
        "cyclical": lambda **kw: BetaKL(CyclicalBeta(**kw)),
        "capacity": lambda gamma, c_max, steps: CapacityKL(
            gamma, CapacitySchedule(c_max=c_max, steps=steps)
        ),
        "free_bits": lambda free_bits, groups=None, beta=1.0: FreeBitsKL(
            free_bits, ConstantBeta(beta=beta), groups
        ),
    }
    if kind not in builders:
        raise ValueError(
            f"build_regulariser: argument 'kind' must be one of {list(REGULARISER_KINDS)}, "
            f"got {kind!r}"
        )
    try:
        return builders[kind](**kwargs)
    except TypeError as error:
        raise ValueError(
            f"build_regulariser: bad keyword arguments {sorted(kwargs)} for kind={kind!r} "
            f"({error}); see the table in build_regulariser's docstring"
        ) from None


def kl_regulariser(
    kl_schedule: str = "constant",
    beta: float = 1.0,
    free_bits: float = 0.0,
    warmup_steps: int = 1000,
    cycle_steps: int = 1000,
    cycle_ratio: float = 0.5,
    capacity_max: float = 25.0,
    capacity_steps: int = 10000,
    capacity_gamma: float = 1000.0,
) -> KLRegulariser:
    """The regulariser of a Gaussian VAE from one flat set of arguments (the Hydra config
    ``model.regulariser``; ``model.beta``, ``model.kl_schedule`` and ``model.free_bits`` feed it).

    ``kl_schedule`` = ``constant`` / ``linear`` (warm-up over ``warmup_steps``) / ``cyclical``
    (``cycle_steps``, ramping for ``cycle_ratio`` of each cycle) gives beta(t), applied to KL, or
    with ``free_bits`` > 0 to max(free_bits, KL_j) per dimension; ``capacity`` replaces
    beta * KL by ``capacity_gamma`` * |KL - C(t)|, C rising to ``capacity_max`` nats over
    ``capacity_steps``, and cannot be combined with free bits.
    """
    if kl_schedule == "capacity":
        if free_bits > 0:
            raise ValueError(
                "kl_regulariser: argument 'free_bits' > 0 cannot be combined with "
                "kl_schedule='capacity'; set one of them"
            )
        return CapacityKL(
            capacity_gamma, CapacitySchedule(c_max=capacity_max, steps=capacity_steps)
        )
    schedules = {
        "constant": lambda: ConstantBeta(beta=beta),
        "linear": lambda: LinearWarmup(beta=beta, warmup_steps=warmup_steps),
        "cyclical": lambda: CyclicalBeta(beta=beta, cycle_steps=cycle_steps, ratio=cycle_ratio),
    }
    if kl_schedule not in schedules:
        raise ValueError(
            f"kl_regulariser: argument 'kl_schedule' must be one of {[*schedules, 'capacity']}, "
            f"got {kl_schedule!r}"
        )
    schedule = schedules[kl_schedule]()
    return FreeBitsKL(free_bits, schedule) if free_bits > 0 else BetaKL(schedule)
