"""KL weight schedules beta(t) and capacity schedules C(t), keyed on the optimizer step.

Every schedule is a pure function of ``step``, the number of optimizer steps taken so far
(Lightning's ``trainer.global_step``). Nothing is counted inside the schedule, so:

* it cannot advance on validation batches (``global_step`` does not move there);
* it resumes exactly from a checkpoint, because ``global_step`` is restored with it;
* calling it twice with the same step gives the same value.

``state_dict()`` still records the hyper-parameters and the last step seen, so a checkpoint
shows the schedule that produced it, and ``load_state_dict`` restores both (a checkpoint's
schedule wins over the constructor's, like an optimizer's state).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vae.losses.validation import require_int, require_number

__all__ = [
    "Schedule",
    "ConstantBeta",
    "LinearWarmup",
    "CyclicalBeta",
    "CapacitySchedule",
]


class Schedule:
    """Base class: subclasses are dataclasses of hyper-parameters with a ``value(step)``."""

    last_step: int | None = None

    def value(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, step: int) -> float:
        """The scheduled value at optimizer step ``step`` (an int >= 0)."""
        step = require_int(type(self).__name__, "step", step, minimum=0)
        self.last_step = step
        return float(self.value(step))

    def state_dict(self) -> dict[str, Any]:
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"kind": type(self).__name__, **state, "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        name = type(self).__name__
        if state.get("kind") != name:
            raise ValueError(
                f"{name}.load_state_dict: argument 'state' holds a {state.get('kind')!r} "
                f"schedule, not a {name}; build the same schedule class as the checkpoint"
            )
        field_names = {f.name for f in dataclasses.fields(self)}
        expected = field_names | {"kind", "last_step"}
        if set(state) != expected:
            raise ValueError(
                f"{name}.load_state_dict: argument 'state' has keys {sorted(state)}, "
                f"expected {sorted(expected)}"
            )
        # Validate through the constructor before touching self, so a bad state changes nothing.
        restored = type(self)(**{k: state[k] for k in field_names})
        for k in field_names:
            setattr(self, k, getattr(restored, k))
        last = state["last_step"]
        self.last_step = None if last is None else require_int(name, "last_step", last)


def _ramp(step: int, steps: int) -> float:
    """Fraction of a linear ramp completed after ``step`` of ``steps`` (1 if steps == 0)."""
    return 1.0 if steps == 0 else min(1.0, step / steps)


@dataclasses.dataclass
class ConstantBeta(Schedule):
    """beta(t) = beta for every t (beta = 1 is the plain ELBO; beta > 1 is the beta-VAE)."""

    beta: float = 1.0

    def __post_init__(self) -> None:
        self.beta = require_number("ConstantBeta", "beta", self.beta)

    def value(self, step: int) -> float:
        return self.beta


@dataclasses.dataclass
class LinearWarmup(Schedule):
    """Linear KL warm-up (Bowman et al. 2016, "Generating sentences from a continuous space").

    beta(t) = start + (beta - start) * min(1, t / warmup_steps)

    so beta(0) = start, beta(warmup_steps / 2) is half-way, and beta(t) = beta from
    t = warmup_steps on. ``warmup_steps = 0`` means no warm-up.
    """

    beta: float = 1.0
    warmup_steps: int = 10_000
    start: float = 0.0

    def __post_init__(self) -> None:
        self.beta = require_number("LinearWarmup", "beta", self.beta)
        self.warmup_steps = require_int("LinearWarmup", "warmup_steps", self.warmup_steps)
        self.start = require_number("LinearWarmup", "start", self.start)

    def value(self, step: int) -> float:
        return self.start + (self.beta - self.start) * _ramp(step, self.warmup_steps)


@dataclasses.dataclass
class CyclicalBeta(Schedule):
    """Cyclical annealing (Fu et al. 2019, "Cyclical annealing schedule").

    With tau = (t mod cycle_steps) / cycle_steps, the position within the current cycle,

        beta(t) = start + (beta - start) * min(1, tau / ratio)

    i.e. each cycle ramps linearly from ``start`` to ``beta`` over the first ``ratio`` of the
    cycle, then holds at ``beta``; the next cycle starts again from ``start``. With
    ``num_cycles`` set, beta stays at ``beta`` after that many cycles (the paper's M cycles
    over a fixed budget); None cycles forever.
    """

    beta: float = 1.0
    cycle_steps: int = 10_000
    ratio: float = 0.5
    start: float = 0.0
    num_cycles: int | None = None

    def __post_init__(self) -> None:
        self.beta = require_number("CyclicalBeta", "beta", self.beta)
        self.cycle_steps = require_int("CyclicalBeta", "cycle_steps", self.cycle_steps, minimum=1)
        self.ratio = require_number("CyclicalBeta", "ratio", self.ratio)
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(
                f"CyclicalBeta: argument 'ratio' (fraction of each cycle spent ramping up) "
                f"must be in (0, 1], got {self.ratio}"
            )
        self.start = require_number("CyclicalBeta", "start", self.start)
        if self.num_cycles is not None:
            self.num_cycles = require_int("CyclicalBeta", "num_cycles", self.num_cycles, minimum=1)

    def value(self, step: int) -> float:
        if self.num_cycles is not None and step >= self.num_cycles * self.cycle_steps:
            return self.beta
        tau = (step % self.cycle_steps) / self.cycle_steps
        return self.start + (self.beta - self.start) * min(1.0, tau / self.ratio)


@dataclasses.dataclass
class CapacitySchedule(Schedule):
    """Linearly increasing KL capacity (Burgess et al. 2018, "Understanding disentangling in
    beta-VAE").

    C(t) = c_max * min(1, t / steps), in nats per example; ``steps = 0`` gives C = c_max.
    """

    c_max: float = 25.0
    steps: int = 100_000

    def __post_init__(self) -> None:
        self.c_max = require_number("CapacitySchedule", "c_max", self.c_max)
        self.steps = require_int("CapacitySchedule", "steps", self.steps)

    def value(self, step: int) -> float:
        return self.c_max * _ramp(step, self.steps)
