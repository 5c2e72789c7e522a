"""Prompt-adherence evaluation: generate for held-out prompts, classify colour and shape by pixel statistics.

The classifier (:func:`eridiffusion.data.shapes.classify_image`) is deterministic and has no learned
weights, so the score measures the diffusion model alone and is reproducible across machines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eridiffusion.config.schema import DatasetConfig, EvalConfig
from eridiffusion.data.shapes import PROMPTS_FILE, score_images
from eridiffusion.inference.generate import GenerateRequest, make_grid, sample, to_pil, upscale_nearest
from eridiffusion.models.protocol import ModelFamily


@dataclass
class EvalSettings:
    images_per_prompt: int = 8
    steps: int = 25
    guidance_scale: float = 4.0
    sampler: str = "ddim"
    seed: int = 1234

    @classmethod
    def from_config(cls, e: EvalConfig, images_per_prompt: int | None = None) -> EvalSettings:
        return cls(images_per_prompt or e.images_per_prompt, e.steps, e.guidance_scale, e.sampler, e.seed)


def prompts_path(e: EvalConfig, datasets: list[DatasetConfig], override: str | None = None) -> Path:
    """The prompts to score: given explicitly, else the first dataset's held-out prompts file (which the
    synthetic shapes writer puts there)."""
    return Path(override or e.prompts_file or Path(datasets[0].folder_path or ".") / PROMPTS_FILE)


def read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"eval prompts file '{path}' does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"eval prompts file '{path}' has no prompts")
    return prompts


def evaluate(
    family: ModelFamily,
    prompts: list[str],
    settings: EvalSettings,
    device: torch.device,
    grid_path: Path | None = None,
) -> dict[str, Any]:
    """Scores for ``prompts``; optionally writes a grid (one row per prompt) for eyeballing."""
    for m in family.modules().values():
        m.eval()
    req = GenerateRequest(
        prompts=prompts,
        steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        sampler=settings.sampler,
        seed=settings.seed,
        images_per_prompt=settings.images_per_prompt,
    )
    images = to_pil(sample(family, req, device))
    report = score_images(images, req.expanded_prompts())
    report["settings"] = vars(settings)
    if grid_path is not None:
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        make_grid([upscale_nearest(im, 64) for im in images], columns=settings.images_per_prompt).save(
            grid_path
        )
        report["grid"] = str(grid_path)
    return report


def evaluate_into(
    family: ModelFamily,
    prompts_file: Path,
    prompts: list[str],
    settings: EvalSettings,
    device: torch.device,
    out_dir: Path,
    **info: str,
) -> dict[str, Any]:
    """:func:`evaluate`, with the grid and the report (``eval_grid.png``, ``eval.json``, plus ``info`` such as
    the model evaluated) written to ``out_dir``: what ``eri eval`` and a pipeline step's ``eval`` leave."""
    report = evaluate(family, prompts, settings, device, grid_path=out_dir / "eval_grid.png")
    report.update(info)
    report["prompts_file"] = str(prompts_file)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report
