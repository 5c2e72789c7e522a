"""Sampler names (A1111 labels and snake_case keys) resolve to fresh diffusers schedulers."""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any

import pytest
import torch
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

from eridiffusion.inference.samplers import (
    SAMPLERS,
    check_sampler,
    compatible_samplers,
    default_sampler,
    make_scheduler,
    resolve_sampler,
)
from eridiffusion.models.objectives import DDPMObjective, FlowMatchObjective


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("ddim", "ddim"),
        ("DDIM", "ddim"),
        ("dpmpp_2m_karras", "dpmpp_2m_karras"),
        ("DPM++ 2M Karras", "dpmpp_2m_karras"),
        ("dpm++ 2m karras", "dpmpp_2m_karras"),
        ("DPM++ 2M", "dpmpp_2m"),
        ("euler a", "euler_a"),
        ("  Euler A ", "euler_a"),
        ("Euler", "euler"),
        ("unipc", "unipc"),
    ],
)
def test_resolve_sampler(name: str, key: str) -> None:
    assert resolve_sampler(name).key == key


def test_resolve_sampler_maps_to_scheduler_classes() -> None:
    assert resolve_sampler("DPM++ 2M Karras").scheduler is DPMSolverMultistepScheduler
    assert resolve_sampler("DPM++ 2M Karras").extra == {"use_karras_sigmas": True}
    assert resolve_sampler("euler a").scheduler is EulerAncestralDiscreteScheduler


def test_unknown_sampler_lists_choices() -> None:
    with pytest.raises(ValueError) as info:
        resolve_sampler("plms")
    msg = str(info.value)
    assert msg.startswith("unknown sampler 'plms'; choose one of: ddim (DDIM), ddpm (DDPM),")
    assert "dpmpp_2m_karras (DPM++ 2M Karras)" in msg
    assert "euler_a (Euler a)" in msg
    for key in SAMPLERS:
        assert key in msg


def test_make_scheduler_is_fresh_and_matches_objective() -> None:
    obj = DDPMObjective("cosine", "v_prediction")
    a = make_scheduler("ddim", obj.scheduler_config())
    b = make_scheduler("DDIM", obj.scheduler_config())
    assert isinstance(a, DDIMScheduler)
    assert a is not b
    assert a.config.prediction_type == "v_prediction"
    assert a.config.beta_schedule == "squaredcos_cap_v2"
    assert a.config.clip_sample is False
    assert a.config.set_alpha_to_one is False
    torch.testing.assert_close(a.alphas_cumprod.float(), obj.alphas_cumprod)
    # per-run state does not leak between calls
    a.set_timesteps(5)
    assert len(a.timesteps) == 5
    assert len(b.timesteps) == 1000


def test_make_scheduler_karras_option() -> None:
    obj = DDPMObjective("linear", "epsilon", beta_start=1e-4, beta_end=2e-2)
    sched = make_scheduler("DPM++ 2M Karras", obj.scheduler_config())
    assert isinstance(sched, DPMSolverMultistepScheduler)
    assert sched.config.use_karras_sigmas is True
    assert sched.config.prediction_type == "epsilon"
    assert sched.config.beta_start == 1e-4
    assert sched.config.beta_end == 2e-2
    assert make_scheduler("dpmpp_2m", obj.scheduler_config()).config.use_karras_sigmas is False


@pytest.mark.parametrize("beta_schedule", ["linear", "cosine", "quadratic"])
@pytest.mark.parametrize("key", compatible_samplers("v_prediction"))
def test_every_sampler_builds_for_every_objective(key: str, beta_schedule: str) -> None:
    obj = DDPMObjective(beta_schedule, "v_prediction")
    sched = make_scheduler(key, obj.scheduler_config())
    assert isinstance(sched, SAMPLERS[key].scheduler)
    assert sched.config.prediction_type == "v_prediction"
    assert sched.config.num_train_timesteps == 1000
    sched.set_timesteps(4)
    assert len(sched.timesteps) >= 4


def test_flow_sampler_is_registered_unambiguously() -> None:
    """A1111 calls the flow sampler "Euler" too; here "euler" stays the DDPM Euler and flow has its own."""
    assert resolve_sampler("flow_euler").scheduler is FlowMatchEulerDiscreteScheduler
    assert resolve_sampler("Flow Euler").key == "flow_euler"
    assert resolve_sampler("Euler").key == "euler"
    assert compatible_samplers("flow") == ["flow_euler"]
    assert "flow_euler" not in compatible_samplers("epsilon")
    assert set(compatible_samplers("epsilon")) == set(SAMPLERS) - {"flow_euler"}
    assert default_sampler("epsilon") == "ddim" and default_sampler("flow") == "flow_euler"


def test_incompatible_samplers_are_refused_with_the_alternatives() -> None:
    with pytest.raises(ValueError) as info:
        check_sampler("ddim", "flow")
    assert str(info.value) == (
        "sampler 'ddim' (DDIM) is for epsilon/v-prediction models, but this model predicts 'flow'; "
        "use one of: flow_euler (Flow Euler)"
    )
    with pytest.raises(
        ValueError,
        match=r"'flow_euler' \(Flow Euler\) is for flow-matching models, but "
        r"this model predicts 'epsilon'; use one of: ddim \(DDIM\), ddpm \(DDPM\)",
    ):
        check_sampler("flow_euler", "epsilon")
    assert check_sampler("Flow Euler", "flow").key == "flow_euler"


@pytest.mark.parametrize("dynamic", [False, True])
def test_flow_scheduler_matches_the_objective(dynamic: bool) -> None:
    obj = FlowMatchObjective(shift=3.0, dynamic_shift=dynamic, full_range_sigmas=dynamic)
    sched = make_scheduler("flow_euler", obj.scheduler_config())
    assert isinstance(sched, FlowMatchEulerDiscreteScheduler)
    assert sched.config.shift == 3.0 and sched.config.use_dynamic_shifting is dynamic
    sched.set_timesteps(4, **obj.set_timesteps_kwargs(4, (16, 64, 64)))
    assert len(sched.timesteps) == 4 and float(sched.sigmas[-1]) == 0.0
    torch.testing.assert_close(sched.timesteps, sched.sigmas[:-1] * 1000)


@dataclass(frozen=True)
class Pinned:
    """What an A1111 sampler name means, written here independently of the registry."""

    scheduler: type
    karras: bool = False
    ancestral: bool = False
    """Adds fresh noise at every step (A1111's "a" samplers, and DDPM's posterior sampling)."""
    evals_per_step: int = 1
    """Model evaluations per step: 2 for Heun's second-order correction (diffusers' ``order``)."""
    multistep_order: int | None = None
    algorithm: str | None = None


PINNED: dict[str, Pinned] = {
    "DDIM": Pinned(DDIMScheduler),
    "DDPM": Pinned(DDPMScheduler, ancestral=True),
    "Euler": Pinned(EulerDiscreteScheduler),
    "Euler a": Pinned(EulerAncestralDiscreteScheduler, ancestral=True),
    "Heun": Pinned(HeunDiscreteScheduler, evals_per_step=2),
    "DPM++ 2M": Pinned(DPMSolverMultistepScheduler, multistep_order=2, algorithm="dpmsolver++"),
    "DPM++ 2M Karras": Pinned(
        DPMSolverMultistepScheduler, karras=True, multistep_order=2, algorithm="dpmsolver++"
    ),
    "UniPC": Pinned(UniPCMultistepScheduler, multistep_order=2),
    "Flow Euler": Pinned(FlowMatchEulerDiscreteScheduler),
}


def _adds_noise(sched: Any) -> bool:
    """Does one step's result depend on the generator? (Behaviour, not the registry's ``stochastic`` flag.)"""
    if "generator" not in inspect.signature(sched.step).parameters:
        return False
    sched.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    sample, output = torch.randn((1, 4, 8, 8), generator=g), torch.randn((1, 4, 8, 8), generator=g)
    t = sched.timesteps[0]
    if hasattr(sched, "scale_model_input"):  # the k-diffusion style schedulers scale their input first
        sample = sched.scale_model_input(sample, t)
    results = []
    for seed in (1, 2):
        fresh = copy.deepcopy(sched)
        step = fresh.step(output, t, sample, generator=torch.Generator().manual_seed(seed))
        results.append(step.prev_sample)
    return not torch.equal(*results)


def test_registry_names_exactly_the_pinned_samplers() -> None:
    assert sorted(s.label for s in SAMPLERS.values()) == sorted(PINNED)


@pytest.mark.parametrize("label", sorted(PINNED))
def test_a1111_name_builds_its_pinned_scheduler(label: str) -> None:
    want = PINNED[label]
    objective = FlowMatchObjective(shift=1.0) if label == "Flow Euler" else DDPMObjective("linear", "epsilon")
    sched = make_scheduler(label, objective.scheduler_config())
    assert type(sched) is want.scheduler, f"{label} builds {type(sched).__name__}"
    assert bool(sched.config.get("use_karras_sigmas")) is want.karras
    assert sched.order == want.evals_per_step
    assert sched.config.get("solver_order") == want.multistep_order
    assert sched.config.get("algorithm_type") == want.algorithm
    assert _adds_noise(sched) is want.ancestral
    assert resolve_sampler(label).stochastic is want.ancestral
