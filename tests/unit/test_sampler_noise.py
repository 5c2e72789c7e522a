"""Sampler noise and schedules: ancestral/SDE samplers give each image its own generator (image i of a
batch == seed+i alone), Euler a survives a cosine schedule's huge first sigma, and Karras spacing on such a
schedule is refused up front with the reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eridiffusion.inference.generate import GenerateRequest, sample, to_pil
from eridiffusion.inference.samplers import make_scheduler, precise_sigmas
from eridiffusion.models import build_family
from eridiffusion.models.objectives import DDPMObjective
from tests.conftest import TINY_OPTIONS

COSINE_V = {**TINY_OPTIONS, "beta_schedule": "cosine", "prediction_type": "v_prediction"}


def _pixels(images: torch.Tensor) -> list[np.ndarray]:
    return [np.asarray(i).astype(int) for i in to_pil(images)]


@pytest.mark.parametrize("sampler", ["euler_a", "ddpm"])
def test_stochastic_sampler_batch_image_equals_its_seed_alone(sampler: str) -> None:
    family = build_family("tiny", TINY_OPTIONS, seed=0)
    batch = GenerateRequest(["a red circle"], steps=4, sampler=sampler, seed=10, images_per_prompt=3)
    together = _pixels(sample(family, batch))
    for i in range(3):
        alone = GenerateRequest(["a red circle"], steps=4, sampler=sampler, seed=10 + i)
        assert np.abs(_pixels(sample(family, alone))[0] - together[i]).max() <= 1, i
    assert np.abs(together[0] - together[1]).mean() > 1  # the images do differ


def test_euler_a_at_four_steps_on_a_cosine_schedule_is_finite() -> None:
    """In float32 the ancestral split at sigma 2e4 -> 1.75 cancels to a negative number (NaN image)."""
    cfg = DDPMObjective("cosine", "v_prediction").scheduler_config()
    scheduler = make_scheduler("euler_a", cfg)
    scheduler.set_timesteps(4)
    s_from, s_to = scheduler.sigmas[0], scheduler.sigmas[1]
    up2 = s_to**2 * (s_from**2 - s_to**2) / s_from**2
    assert s_to**2 - up2 < 0  # float32: the cancellation diffusers' step would take the sqrt of
    precise_sigmas(scheduler)
    s_from, s_to = scheduler.sigmas[0], scheduler.sigmas[1]
    assert s_to**2 - s_to**2 * (s_from**2 - s_to**2) / s_from**2 > 0
    family = build_family("tiny", COSINE_V, seed=0)
    for steps in (3, 4, 5):
        images = sample(family, GenerateRequest(["a"], steps=steps, sampler="euler_a", seed=1))
        assert torch.isfinite(images).all(), steps


def test_karras_on_a_cosine_schedule_is_refused_with_the_reason() -> None:
    family = build_family("tiny", COSINE_V, seed=0)
    req = GenerateRequest(["a"], steps=10, sampler="dpmpp_2m_karras", seed=1)
    with pytest.raises(ValueError, match=r"Karras spacing crowds the steps near sigma_max.*dpmpp_2m"):
        sample(family, req)
    assert torch.isfinite(sample(build_family("tiny", TINY_OPTIONS, seed=0), req)).all()
