"""Learning-rate multipliers as pure functions of the step."""

from __future__ import annotations

import math

import pytest

from eridiffusion.training.schedules import lr_factor


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
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
    with pytest.raises(ValueError, match="unknown lr_scheduler 'step'; use constant, linear or cosine"):
        lr_factor(0, 10, "step")
