"""Sample grids during training, drawn with the weights the run would save (the EMA's when it has one)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from eridiffusion.config.schema import JobConfig
from eridiffusion.inference.generate import GenerateRequest, make_grid, sample, to_pil, upscale_nearest
from eridiffusion.models import ModelFamily
from eridiffusion.training.ema import EMA


@contextlib.contextmanager
def ema_weights(ema: EMA | None, params: dict[str, nn.Parameter]) -> Iterator[None]:
    """Temporarily evaluate with the EMA weights (sampling during training)."""
    if ema is not None:
        ema.swap_into(params)
    try:
        yield
    finally:
        if ema is not None:
            ema.swap_into(params)


def save_samples(
    family: ModelFamily, cfg: JobConfig, step: int, device: torch.device, write: bool = True
) -> Path | None:
    """``sample.prompts`` as one grid, ``samples/step_NNNNNN.png``; the training RNG is left untouched.
    ``write=False`` draws without saving (the other processes of a sharded model take part in the draw)."""
    s = cfg.sample
    if not s.prompts:
        return None
    req = GenerateRequest(
        prompts=s.prompts,
        negative_prompt=s.negative_prompt,
        steps=s.steps,
        guidance_scale=s.guidance_scale,
        sampler=s.sampler,
        seed=s.seed,
        images_per_prompt=s.images_per_prompt,
    )
    modes = {name: m.training for name, m in family.modules().items()}
    for m in family.modules().values():
        m.eval()
    with torch.random.fork_rng(devices=[]):
        images = [upscale_nearest(im) for im in to_pil(sample(family, req, device))]
    for name, m in family.modules().items():
        m.train(modes[name])
    if not write:
        return None
    path = cfg.run_dir / "samples" / f"step_{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, columns=s.images_per_prompt).save(path)
    return path
