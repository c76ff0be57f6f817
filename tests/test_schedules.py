"""β schedules and the learning-rate decay at known epochs."""

import pytest

from vaelab.errors import ConfigError
from vaelab.schedules import ConstantBeta, CyclicalBeta, LinearBeta, cosine_lr


def test_constant():
    assert [ConstantBeta(0.3)(e) for e in (0, 5.5, 1000)] == [0.3, 0.3, 0.3]


@pytest.mark.parametrize(
    ("epoch", "beta"), [(0, 0.0), (5, 0.25), (7.5, 0.375), (10, 0.5), (200, 0.5)]
)
def test_linear_warmup(epoch, beta):
    assert LinearBeta(beta=0.5, warmup_epochs=10)(epoch) == pytest.approx(beta)


def test_linear_without_warmup_starts_at_beta():
    assert LinearBeta(beta=0.7, warmup_epochs=0)(0) == pytest.approx(0.7)


@pytest.mark.parametrize(
    ("epoch", "beta"),
    [
        (0, 0.0),
        (15, 0.25),  # halfway up the 30-epoch ramp of a 40-epoch cycle (seed 000)
        (30, 0.5),
        (39.9, 0.5),  # held until the restart
        (40, 0.0),  # restart
        (55, 0.25),
        (80, 0.0),
    ],
)
def test_cyclical_seed_000_settings(epoch, beta):
    schedule = CyclicalBeta(beta=0.5, cycle_epochs=40, ramp_ratio=0.75)
    assert schedule(epoch) == pytest.approx(beta)


def test_schedules_are_pure_functions():
    schedule = CyclicalBeta(beta=1.0, cycle_epochs=4, ramp_ratio=0.5)
    first = [schedule(e / 3) for e in range(30)]
    assert [schedule(e / 3) for e in range(30)] == first  # calling again changes nothing


@pytest.mark.parametrize(
    ("make", "key"),
    [
        (lambda: CyclicalBeta(cycle_epochs=0), "schedule.cycle_epochs"),
        (lambda: CyclicalBeta(ramp_ratio=0), "schedule.ramp_ratio"),
        (lambda: LinearBeta(warmup_epochs=-1), "schedule.warmup_epochs"),
    ],
)
def test_bad_schedule_settings_name_the_key(make, key):
    with pytest.raises(ConfigError, match=key):
        make()


def test_cosine_lr_endpoints_and_midpoint():
    assert cosine_lr(0.0, 1e-3, 0.01) == pytest.approx(1e-3)
    assert cosine_lr(0.5, 1e-3, 0.01) == pytest.approx(0.5 * (1e-3 + 1e-5))
    assert cosine_lr(1.0, 1e-3, 0.01) == pytest.approx(1e-5)
