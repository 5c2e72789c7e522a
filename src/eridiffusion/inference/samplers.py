"""Sampler names users know (A1111's and short snake_case ones) mapped to diffusers schedulers.

A scheduler object carries per-run state, so :func:`make_scheduler` builds a fresh one for every call.
Each sampler states the prediction types it integrates: the DDPM-family samplers (epsilon / v) and the
flow-matching Euler sampler (rectified flow's ODE, Esser et al. 2024) are not interchangeable, and
:func:`check_sampler` says so before any work is done. A1111 and ComfyUI call the flow sampler "Euler" too;
here it is ``flow_euler`` ("Flow Euler") so every name means one thing.
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
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

DDPM_PREDICTIONS = frozenset({"epsilon", "v_prediction"})
FLOW_PREDICTIONS = frozenset({"flow"})


@dataclass(frozen=True)
class SamplerSpec:
    key: str
    label: str
    scheduler: type[SchedulerMixin]
    extra: dict[str, Any] = field(default_factory=dict)
    prediction_types: frozenset[str] = DDPM_PREDICTIONS
    """Objectives (``NoiseObjective.prediction_type``) this sampler integrates correctly."""
    stochastic: bool = False
    """Draws fresh noise every step (image i from its own generator, see ``generate.image_generators``)."""


SAMPLERS: dict[str, SamplerSpec] = {
    s.key: s
    for s in (
        SamplerSpec("ddim", "DDIM", DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": False}),
        SamplerSpec("ddpm", "DDPM", DDPMScheduler, {"clip_sample": False}, stochastic=True),
        SamplerSpec("euler", "Euler", EulerDiscreteScheduler),
        SamplerSpec("euler_a", "Euler a", EulerAncestralDiscreteScheduler, stochastic=True),
        SamplerSpec("heun", "Heun", HeunDiscreteScheduler),
        SamplerSpec("dpmpp_2m", "DPM++ 2M", DPMSolverMultistepScheduler),
        SamplerSpec(
            "dpmpp_2m_karras", "DPM++ 2M Karras", DPMSolverMultistepScheduler, {"use_karras_sigmas": True}
        ),
        SamplerSpec("unipc", "UniPC", UniPCMultistepScheduler),
        SamplerSpec(
            "flow_euler", "Flow Euler", FlowMatchEulerDiscreteScheduler, prediction_types=FLOW_PREDICTIONS
        ),
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


def precise_sigmas(scheduler: SchedulerMixin) -> None:
    """Hold an ancestral scheduler's sigmas in float64 (CPU/CUDA; MPS has no float64).

    Euler a splits each step into sigma_up = sqrt(s_to^2 (s_from^2 - s_to^2) / s_from^2) and
    sigma_down = sqrt(s_to^2 - sigma_up^2). When s_from is huge (a cosine schedule's first sigma is ~2e4)
    the float32 difference cancels to a rounding error that can be negative, and sigma_down becomes NaN:
    the whole image turns NaN (seen at exactly 4 steps). In float64 the difference stays positive; the
    latents stay float32 (a 0-d float64 tensor does not promote them)."""
    sigmas = getattr(scheduler, "sigmas", None)
    ancestral = isinstance(scheduler, EulerAncestralDiscreteScheduler)
    if ancestral and sigmas is not None and sigmas.device.type != "mps":
        scheduler.sigmas = sigmas.double()


def compatible_samplers(prediction_type: str) -> list[str]:
    """Keys of the samplers that integrate a model trained with ``prediction_type``, in registry order."""
    return [s.key for s in SAMPLERS.values() if prediction_type in s.prediction_types]


def check_sampler(name: str, prediction_type: str) -> SamplerSpec:
    """The sampler ``name``, or a ValueError naming the ones that suit this model."""
    spec = resolve_sampler(name)
    if prediction_type not in spec.prediction_types:
        kinds = "flow-matching" if spec.prediction_types == FLOW_PREDICTIONS else "epsilon/v-prediction"
        suitable = ", ".join(f"{k} ({SAMPLERS[k].label})" for k in compatible_samplers(prediction_type))
        raise ValueError(
            f"sampler {name!r} ({spec.label}) is for {kinds} models, but this model predicts "
            f"{prediction_type!r}; use one of: {suitable}"
        )
    return spec


def default_sampler(prediction_type: str) -> str:
    """The sampler used when none is named: DDIM for epsilon/v models, Flow Euler for flow models."""
    return compatible_samplers(prediction_type)[0]
