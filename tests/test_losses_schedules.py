"""KL schedules beta(t) / C(t): key points, purity in the step, checkpoint round trips."""

import io

import pytest
import torch

from vae.losses import CapacitySchedule, ConstantBeta, CyclicalBeta, LinearWarmup


def test_constant_beta():
    schedule = ConstantBeta(beta=4.0)
    assert [schedule(t) for t in (0, 1, 10**9)] == [4.0, 4.0, 4.0]
    assert ConstantBeta()(7) == 1.0


def test_linear_warmup_key_points():
    schedule = LinearWarmup(beta=2.0, warmup_steps=100)
    assert schedule(0) == 0.0
    assert schedule(25) == pytest.approx(0.5)
    assert schedule(50) == pytest.approx(1.0)
    assert schedule(100) == 2.0
    assert schedule(10_000) == 2.0
    offset = LinearWarmup(beta=1.0, warmup_steps=10, start=0.2)
    assert offset(0) == pytest.approx(0.2) and offset(5) == pytest.approx(0.6) and offset(10) == 1.0
    assert LinearWarmup(beta=3.0, warmup_steps=0)(0) == 3.0


def test_cyclical_key_points():
    schedule = CyclicalBeta(beta=1.0, cycle_steps=100, ratio=0.5)
    expected = {0: 0.0, 25: 0.5, 50: 1.0, 75: 1.0, 99: 1.0, 100: 0.0, 125: 0.5, 150: 1.0, 399: 1.0}
    assert {t: schedule(t) for t in expected} == pytest.approx(expected)
    full_ramp = CyclicalBeta(beta=2.0, cycle_steps=10, ratio=1.0)
    assert [full_ramp(t) for t in (0, 5, 9, 10)] == pytest.approx([0.0, 1.0, 1.8, 0.0])
    limited = CyclicalBeta(beta=1.0, cycle_steps=100, ratio=0.5, num_cycles=2)
    assert limited(125) == pytest.approx(0.5)
    assert limited(200) == 1.0 and limited(225) == 1.0 and limited(10**6) == 1.0


def test_capacity_key_points():
    schedule = CapacitySchedule(c_max=25.0, steps=100)
    assert [schedule(t) for t in (0, 50, 100, 500)] == pytest.approx([0.0, 12.5, 25.0, 25.0])


def test_schedules_are_pure_functions_of_the_step():
    # Validation batches call the schedule with an unchanged global_step: nothing advances.
    schedule = LinearWarmup(beta=1.0, warmup_steps=100)
    values = [schedule(40) for _ in range(5)]
    assert values == [pytest.approx(0.4)] * 5
    forward = [schedule(t) for t in range(0, 120, 7)]
    backward = [schedule(t) for t in reversed(range(0, 120, 7))][::-1]
    assert forward == backward
    assert schedule.last_step == 0


@pytest.mark.parametrize(
    "schedule",
    [
        ConstantBeta(beta=0.5),
        LinearWarmup(beta=2.0, warmup_steps=30, start=0.1),
        CyclicalBeta(beta=1.5, cycle_steps=40, ratio=0.25, num_cycles=3),
        CapacitySchedule(c_max=10.0, steps=20),
    ],
    ids=lambda s: type(s).__name__,
)
def test_state_dict_round_trip_through_torch_save(schedule):
    schedule(17)
    buffer = io.BytesIO()
    torch.save(schedule.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = type(schedule)()  # default hyper-parameters, as after a restart with no config
    fresh.load_state_dict(state)
    assert fresh == schedule and fresh.last_step == 17
    assert [fresh(t) for t in range(0, 200, 9)] == [schedule(t) for t in range(0, 200, 9)]


def test_load_state_dict_rejects_another_kind_or_bad_values():
    state = LinearWarmup(warmup_steps=5).state_dict()
    with pytest.raises(ValueError, match="holds a 'LinearWarmup' schedule, not a CyclicalBeta"):
        CyclicalBeta().load_state_dict(state)
    schedule = LinearWarmup(beta=1.0, warmup_steps=5)
    with pytest.raises(ValueError, match="'beta'"):
        schedule.load_state_dict({**state, "beta": -1.0})
    assert schedule.beta == 1.0, "a rejected state must leave the schedule unchanged"
    with pytest.raises(ValueError, match="expected"):
        schedule.load_state_dict({**state, "extra": 1})


@pytest.mark.parametrize(
    "build, argument",
    [
        (lambda: ConstantBeta(beta=-1.0), "beta"),
        (lambda: ConstantBeta(beta="1e-3"), "beta"),  # YAML 1.1 reads `1e-3` as a string
        (lambda: ConstantBeta(beta=float("nan")), "beta"),
        (lambda: LinearWarmup(warmup_steps=-1), "warmup_steps"),
        (lambda: LinearWarmup(warmup_steps=2.5), "warmup_steps"),
        (lambda: LinearWarmup(start=-0.1), "start"),
        (lambda: CyclicalBeta(cycle_steps=0), "cycle_steps"),
        (lambda: CyclicalBeta(ratio=0.0), "ratio"),
        (lambda: CyclicalBeta(ratio=1.5), "ratio"),
        (lambda: CyclicalBeta(num_cycles=0), "num_cycles"),
        (lambda: CapacitySchedule(c_max=-5.0), "c_max"),
        (lambda: CapacitySchedule(steps=-1), "steps"),
        (lambda: ConstantBeta()(-1), "step"),
        (lambda: ConstantBeta()(1.5), "step"),
    ],
)
def test_bad_arguments_name_the_argument(build, argument):
    with pytest.raises(ValueError, match=f"argument '{argument}'"):
        build()


def test_integral_floats_and_tensor_steps_are_accepted():
    assert LinearWarmup(warmup_steps=100.0).warmup_steps == 100
    assert LinearWarmup(beta=1.0, warmup_steps=10)(torch.tensor(5)) == pytest.approx(0.5)
