"""The learning rate and the loss prefactors follow deepmd-kit's "exp" schedule (spec §9.1, §9.3).

The oracle is deepmd-kit's own schedule (its numpy backend, `LearningRateExp`), evaluated on the same options;
the spec's worked numbers for the water recipe are checked too.
"""

import math

import pytest

from dpa3_ref.errors import Dpa3Error
from dpa3_ref.schedule import exp_schedule, prefactor

learning_rate = pytest.importorskip("deepmd.dpmodel.utils.learning_rate", reason="needs deepmd-kit (the oracle)")

CASES = [
    dict(start_lr=1e-3, stop_lr=3e-5, decay_steps=5000, num_steps=1_000_000),  # the water recipe
    dict(start_lr=1e-3, stop_lr=1e-5, decay_steps=5000, num_steps=500),  # short run: decay_steps reset
    dict(start_lr=2e-3, stop_lr=1e-8, decay_steps=50, num_steps=20_000),  # the floor stop_lr is reached
    dict(start_lr=1e-3, stop_lr_ratio=0.01, decay_steps=10, num_steps=200, warmup_steps=20, warmup_start_factor=0.1),
    dict(start_lr=1e-3, stop_lr=1e-4, decay_steps=7, num_steps=100, smooth=True),
    dict(start_lr=1e-3, stop_lr=1e-4, decay_steps=10, decay_rate=0.5, num_steps=100),
]


@pytest.mark.parametrize("options", CASES)
def test_learning_rate_equals_deepmd_kit(options):
    official = learning_rate.LearningRateExp(**options)
    ours = exp_schedule(options.pop("start_lr"), options.pop("num_steps"), **options)
    assert ours.decay_steps == official.decay_steps
    steps = sorted({0, 1, 5, 6, 7, 19, 20, 21, 99, 100, 101, 499, 5000, 500_000, 999_999} & set(range(official.num_steps)))
    for step in steps:
        assert ours.value(step) == float(official.value(step)), step  # bit for bit


def test_water_recipe_numbers_from_the_spec():
    schedule = exp_schedule(1e-3, 1_000_000, stop_lr=3e-5, decay_steps=5000)
    assert schedule.decay_rate == pytest.approx(0.98262002, abs=1e-8)
    assert schedule.value(500_000) == pytest.approx(1.73e-4, rel=2e-3)


def test_short_runs_decay_within_the_run():
    # deepmd-kit's rule: decay_steps >= numb_steps resets it to numb_steps // 100 + 1 (or 100 for long runs)
    assert exp_schedule(1e-3, 500, stop_lr=1e-5, decay_steps=5000).decay_steps == 6
    assert exp_schedule(1e-3, 1000, stop_lr=1e-5, decay_steps=5000).decay_steps == 11
    assert exp_schedule(1e-3, 5000, stop_lr=1e-5, decay_steps=5000).decay_steps == 100
    assert exp_schedule(1e-3, 2000, stop_lr=1e-5, decay_steps=5000, decay_rate=0.9).decay_steps == 5000
    last = exp_schedule(1e-3, 500, stop_lr=1e-5, decay_steps=5000).value(499)
    assert last == pytest.approx(1e-5, rel=0.1)


def test_rate_used_by_the_update_is_lambda_lr_product():
    schedule = exp_schedule(1e-3, 1000, stop_lr=1e-5, decay_steps=10)
    for step in range(0, 1000, 37):
        assert schedule(step) == 1e-3 * (schedule.value(step) / 1e-3)
        assert schedule(step) == pytest.approx(schedule.value(step), rel=1e-15)


def test_prefactors_interpolate_with_the_learning_rate():
    # p = limit + (start - limit) * lr / lr0: at lr0 the start value, at lr -> 0 the limit
    assert prefactor(0.2, 20.0, 1e-3, 1e-3) == pytest.approx(0.2)
    assert prefactor(100.0, 60.0, 5e-4, 1e-3) == pytest.approx(80.0)
    assert prefactor(0.02, 1.0, 0.0, 1e-3) == 1.0


def test_bad_options_are_named():
    with pytest.raises(Dpa3Error, match="stop_lr"):
        exp_schedule(1e-3, 100)
    with pytest.raises(Dpa3Error, match="decay_steps"):
        exp_schedule(1e-3, 100, stop_lr=1e-5, decay_steps=0)
    with pytest.raises(Dpa3Error, match="start_lr"):
        exp_schedule(math.nan, 100, stop_lr=1e-5)
