"""Learning-rate schedules as pure functions of the optimizer step (resume needs no scheduler state).

Names follow diffusers/transformers' ``get_scheduler`` so kohya and ai-toolkit configs carry over:
``constant``, ``constant_with_warmup``, ``linear``, ``cosine``, ``cosine_with_restarts`` (kohya's
``lr_scheduler_num_cycles`` is ``lr_cycles``), ``polynomial`` (``lr_scheduler_power`` is ``lr_power``) and
``inverse_sqrt`` (Vaswani et al. 2017). Every one takes a linear warmup first.
"""

from __future__ import annotations

import math
from typing import Protocol


class ScheduleSettings(Protocol):
    """The schedule fields of ``train`` (TrainConfig) and of a pipeline step's optimizer (GroupConfig)."""

    lr_scheduler: str
    lr_warmup_steps: int
    lr_cycles: int
    lr_power: float


def lr_factor(
    step: int, total_steps: int, kind: str, warmup_steps: int = 0, cycles: int = 1, power: float = 1.0
) -> float:
    """Multiplier on the base LR at optimizer step ``step`` (0-based).

    Linear warmup from 1/warmup to 1 over ``warmup_steps``, then the named decay over the remaining steps
    (to 0 for the decaying kinds; ``inverse_sqrt`` falls as sqrt(warmup / step) and never reaches 0).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    if kind == "inverse_sqrt":
        scale = max(1, warmup_steps)
        return math.sqrt(scale / max(scale, step + 1))
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0)))
    if kind == "polynomial":
        return (1.0 - progress) ** power
    raise ValueError(
        f"unknown lr_scheduler {kind!r}; use constant, constant_with_warmup, linear, cosine, "
        "cosine_with_restarts, polynomial or inverse_sqrt"
    )


def scheduled_lr(step: int, total_steps: int, base_lr: float, schedule: ScheduleSettings) -> float:
    """The LR at ``step`` for a config section holding the schedule fields (``train`` or a step's group)."""
    return base_lr * lr_factor(
        step,
        total_steps,
        schedule.lr_scheduler,
        schedule.lr_warmup_steps,
        schedule.lr_cycles,
        schedule.lr_power,
    )
