"""Learning-rate schedules as pure functions of the optimizer step (resume needs no scheduler state)."""

from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int, kind: str, warmup_steps: int = 0) -> float:
    """Multiplier on the base LR at optimizer step ``step`` (0-based).

    Linear warmup from 1/warmup to 1 over ``warmup_steps``, then ``constant``, ``linear`` decay to 0 or
    half-cosine decay to 0 over the remaining steps.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_scheduler {kind!r}; use constant, linear or cosine")
