"""Sample grids during training, drawn with the weights the run would save (the EMA's when it has one).

Each prompt is one row, with its own size, seed, steps, guidance and negative prompt when it sets them (a
mapping, as ai-toolkit's ``samples`` list, or kohya's prompt-line flags, see ``SamplePrompt.from_line``), and
``[trigger]`` replaced by the datasets' trigger word. The sampler defaults to the family's own (Flow Euler
for flow-matching models).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from eridiffusion.config.schema import JobConfig, SamplePrompt
from eridiffusion.inference.generate import GenerateRequest, sample, to_pil, upscale_nearest
from eridiffusion.inference.samplers import default_sampler
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


def resolve_prompts(cfg: JobConfig) -> list[SamplePrompt]:
    """The grid's rows with every setting filled in from the ``sample`` section and ``[trigger]`` replaced."""
    s = cfg.sample
    trigger = next((d.trigger_word for d in cfg.datasets if d.trigger_word), "")
    rows = []
    for i, item in enumerate(s.prompts):
        row = SamplePrompt.from_line(item) if isinstance(item, str) else item
        seed = row.seed if row.seed is not None else s.seed + (i * s.images_per_prompt if s.walk_seed else 0)
        text = " ".join(row.prompt.replace("[trigger]", trigger).split())
        rows.append(
            SamplePrompt(
                prompt=text,
                negative_prompt=s.negative_prompt if row.negative_prompt is None else row.negative_prompt,
                width=row.width or s.width,
                height=row.height or s.height,
                seed=seed,
                steps=row.steps or s.steps,
                guidance_scale=s.guidance_scale if row.guidance_scale is None else row.guidance_scale,
            )
        )
    return rows


def _grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Rows of images of possibly different sizes, each in a cell of the largest size."""
    w = max(im.width for row in rows for im in row)
    h = max(im.height for row in rows for im in row)
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), (0, 0, 0))
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            grid.paste(im, (x * w, y * h))
    return grid


def save_samples(
    family: ModelFamily, cfg: JobConfig, step: int, device: torch.device, write: bool = True
) -> Path | None:
    """``sample.prompts`` as one grid, ``samples/step_NNNNNN.png``; the training RNG is left untouched.
    ``write=False`` draws without saving (the other processes of a sharded model take part in the draw)."""
    s = cfg.sample
    if not s.prompts:
        return None
    sampler = s.sampler or default_sampler(family.objective.prediction_type)
    modes = {name: m.training for name, m in family.modules().items()}
    for m in family.modules().values():
        m.eval()
    rows = []
    with torch.random.fork_rng(devices=[]):
        for row in resolve_prompts(cfg):
            req = GenerateRequest(
                prompts=[row.prompt],
                negative_prompt=row.negative_prompt or "",
                steps=row.steps or s.steps,
                guidance_scale=row.guidance_scale if row.guidance_scale is not None else s.guidance_scale,
                sampler=sampler,
                seed=row.seed or 0,
                images_per_prompt=s.images_per_prompt,
                width=row.width,
                height=row.height,
            )
            rows.append([upscale_nearest(im) for im in to_pil(sample(family, req, device))])
    for name, m in family.modules().items():
        m.train(modes[name])
    if not write:
        return None
    path = cfg.run_dir / "samples" / f"step_{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    _grid(rows).save(path)
    return path
