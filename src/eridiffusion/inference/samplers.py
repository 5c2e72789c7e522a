"""Sampler names users know (A1111's and short snake_case ones) mapped to diffusers schedulers.

A scheduler object carries per-run state, so :func:`make_scheduler` builds a fresh one for every call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin


@dataclass(frozen=True)
class SamplerSpec:
    key: str
    label: str
    scheduler: type[SchedulerMixin]
    extra: dict[str, Any] = field(default_factory=dict)


SAMPLERS: dict[str, SamplerSpec] = {
    s.key: s
    for s in (
        SamplerSpec("ddim", "DDIM", DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": False}),
        SamplerSpec("ddpm", "DDPM", DDPMScheduler, {"clip_sample": False}),
        SamplerSpec("euler", "Euler", EulerDiscreteScheduler),
        SamplerSpec("euler_a", "Euler a", EulerAncestralDiscreteScheduler),
        SamplerSpec("heun", "Heun", HeunDiscreteScheduler),
        SamplerSpec("dpmpp_2m", "DPM++ 2M", DPMSolverMultistepScheduler),
        SamplerSpec(
            "dpmpp_2m_karras", "DPM++ 2M Karras", DPMSolverMultistepScheduler, {"use_karras_sigmas": True}
        ),
        SamplerSpec("unipc", "UniPC", UniPCMultistepScheduler),
    )
}


def resolve_sampler(name: str) -> SamplerSpec:
    """Accept ``dpmpp_2m_karras``, ``DPM++ 2M Karras`` or ``dpm++ 2m karras`` alike."""
    wanted = name.strip().lower()
    for spec in SAMPLERS.values():
        if wanted in (spec.key, spec.label.lower()):
            return spec
    choices = ", ".join(f"{s.key} ({s.label})" for s in SAMPLERS.values())
    raise ValueError(f"unknown sampler {name!r}; choose one of: {choices}")


def make_scheduler(name: str, objective_config: dict[str, Any]) -> SchedulerMixin:
    """A fresh scheduler matching the training objective (betas, prediction type)."""
    spec = resolve_sampler(name)
    return spec.scheduler(**objective_config, **spec.extra)
