"""One scheduler config: what our samplers use is what `save_pretrained` writes, so diffusers' own
pipeline on a folder we saved gives our images (Euler, the scheduler SD folders ship with)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

from eridiffusion.inference.generate import GenerateRequest, initial_noise, sample
from eridiffusion.inference.samplers import make_scheduler
from eridiffusion.models import build_family, load_family


def test_saved_scheduler_is_the_one_our_samplers_use(tmp_path: Path) -> None:
    family = build_family("sd15", {"preset": "tiny"}, seed=0)
    family.save_pretrained(tmp_path / "sd")
    saved = json.loads((tmp_path / "sd" / "scheduler" / "scheduler_config.json").read_text())
    ours = make_scheduler("euler", load_family(tmp_path / "sd").objective.scheduler_config())
    assert isinstance(ours, EulerDiscreteScheduler)
    for key in ("timestep_spacing", "steps_offset", "beta_schedule", "beta_start", "prediction_type"):
        assert ours.config[key] == saved[key], key
    assert (saved["timestep_spacing"], saved["steps_offset"]) == ("leading", 1)  # SD's convention


def test_diffusers_pipeline_on_our_folder_gives_our_euler_image(tmp_path: Path) -> None:
    family = build_family("sd15", {"preset": "tiny"}, seed=0)
    family.save_pretrained(tmp_path / "sd")
    loaded = load_family(tmp_path / "sd")
    for module in loaded.modules().values():
        module.eval()
    req = GenerateRequest(
        ["a red circle"], steps=4, guidance_scale=4.0, sampler="euler", seed=3, height=32, width=32
    )
    with torch.inference_mode():
        ours = (sample(loaded, req) + 1) / 2
    pipe = StableDiffusionPipeline.from_pretrained(
        tmp_path / "sd", local_files_only=True, safety_checker=None
    )
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    latents = initial_noise(loaded.latent_shape(32, 32), [3])
    theirs = pipe(
        "a red circle",
        height=32,
        width=32,
        num_inference_steps=4,
        guidance_scale=4.0,
        latents=latents,
        output_type="pt",
    ).images
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < 2e-3
