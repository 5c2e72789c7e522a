"""Learning-rate multipliers as pure functions of the step."""

from __future__ import annotations

import math
from typing import get_args

import pytest

from eridiffusion.config.schema import SchedulerName, TrainConfig
from eridiffusion.training.schedules import lr_factor, scheduled_lr

ALL_KINDS = list(get_args(SchedulerName))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_warmup_ramps_linearly_to_one(kind: str) -> None:
    assert [lr_factor(s, 100, kind, warmup_steps=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_constant() -> None:
    assert [lr_factor(s, 10, "constant") for s in (0, 5, 9, 10, 50)] == [1.0] * 5
    assert lr_factor(2, 10, "constant", warmup_steps=2) == 1.0


def test_linear_decays_to_zero() -> None:
    values = [lr_factor(s, 10, "linear") for s in (0, 5, 9, 10, 20)]
    assert values == pytest.approx([1.0, 0.5, 0.1, 0.0, 0.0])


def test_linear_after_warmup() -> None:
    # decay over the 8 steps after a 2-step warmup
    values = [lr_factor(s, 10, "linear", warmup_steps=2) for s in (1, 2, 6, 10)]
    assert values == pytest.approx([1.0, 1.0, 0.5, 0.0])


def test_cosine_after_warmup() -> None:
    def f(step: int) -> float:
        return lr_factor(step, 110, "cosine", warmup_steps=10)

    assert f(9) == 1.0  # last warmup step
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)
    assert f(35) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert f(109) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.99)))
    assert f(109) < 3e-4
    assert f(110) == pytest.approx(0.0, abs=1e-12)
    assert f(500) == pytest.approx(0.0, abs=1e-12)  # clamped past the end


def test_cosine_is_monotone_non_increasing() -> None:
    values = [lr_factor(s, 50, "cosine") for s in range(51)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_warmup_longer_than_run_does_not_divide_by_zero() -> None:
    assert lr_factor(5, 5, "linear", warmup_steps=5) == 1.0


def test_unknown_kind() -> None:
    with pytest.raises(
        ValueError, match="unknown lr_scheduler 'step'; use constant, constant_with_warmup, linear"
    ):
        lr_factor(0, 10, "step")


def test_constant_with_warmup_holds_after_warmup() -> None:
    assert [lr_factor(s, 10, "constant_with_warmup", warmup_steps=2) for s in range(5)] == [0.5, 1, 1, 1, 1]


def test_cosine_with_restarts_restarts_each_cycle() -> None:
    def f(step: int) -> float:
        return lr_factor(step, 100, "cosine_with_restarts", cycles=4)

    assert f(0) == 1.0 and f(25) == pytest.approx(1.0) and f(50) == pytest.approx(1.0)
    assert f(12) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.48)))
    assert f(37) == pytest.approx(f(12))  # the second cycle repeats the first
    assert f(24) < 0.01 and f(100) == 0.0
    assert lr_factor(30, 100, "cosine_with_restarts", cycles=1) == pytest.approx(lr_factor(30, 100, "cosine"))


def test_polynomial_power() -> None:
    assert lr_factor(5, 10, "polynomial", power=2.0) == pytest.approx(0.25)
    assert lr_factor(5, 10, "polynomial", power=1.0) == pytest.approx(lr_factor(5, 10, "linear"))
    assert lr_factor(10, 10, "polynomial", power=0.5) == 0.0


def test_inverse_sqrt_after_warmup() -> None:
    values = [lr_factor(s, 1000, "inverse_sqrt", warmup_steps=4) for s in (0, 3, 4, 15, 399)]
    assert values == pytest.approx([0.25, 1.0, math.sqrt(4 / 5), 0.5, 0.1])
    assert lr_factor(3, 10, "inverse_sqrt") == pytest.approx(0.5)  # no warmup: sqrt(1 / (step + 1))


def test_scheduled_lr_reads_the_config_section() -> None:
    cfg = TrainConfig(lr=2e-3, lr_scheduler="cosine_with_restarts", lr_cycles=2, lr_warmup_steps=2)
    expected = [2e-3 * lr_factor(s, 22, "cosine_with_restarts", 2, cycles=2) for s in range(22)]
    assert [scheduled_lr(s, 22, cfg.lr, cfg) for s in range(22)] == expected
    assert scheduled_lr(12, 22, cfg.lr, cfg) == pytest.approx(2e-3)  # the second cycle starts at full LR
