"""Prompt-adherence evaluation: generate for held-out prompts, classify colour and shape by pixel statistics.

The classifier (:func:`eridiffusion.data.shapes.classify_image`) is deterministic and has no learned
weights, so the score measures the diffusion model alone and is reproducible across machines. The same
classifier scores an autoencoder's round trip against the images' captions: a codec that draws one colour
as another makes every later prompt for that colour fail, whatever the diffusion model learns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from eridiffusion.config.schema import DatasetConfig, EvalConfig
from eridiffusion.data.shapes import PROMPTS_FILE, score_images
from eridiffusion.inference.generate import GenerateRequest, make_grid, sample, to_pil, upscale_nearest
from eridiffusion.inference.generator import pil_to_pixels
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


RECONSTRUCTION_IMAGES = 96
"""Images an autoencoder step's ``eval`` round-trips: as many as a diffusion step's 12 prompts x 8 seeds."""


@torch.no_grad()
def evaluate_reconstructions(
    family: ModelFamily, pixels: torch.Tensor, captions: list[str], out_dir: Path, columns: int = 8
) -> dict[str, Any]:
    """Encode and decode ``pixels`` (in [-1, 1]), score the reconstructions against ``captions`` and, as the
    ceiling, the source images too; writes ``eval.json`` and ``eval_grid.png`` (rows of sources, each
    followed by the same images reconstructed) to ``out_dir``. Captions that name no colour or shape
    give None scores, as for prompts."""
    for m in family.modules().values():
        m.eval()
    sources = to_pil(pixels.float().cpu())
    recon = to_pil(family.decode_latents(family.encode_images(pixels)).float().cpu())
    report = score_images(recon, captions)
    source_scores = score_images(sources, captions)
    report["source_images"] = {k: source_scores[f"{k}_accuracy"] for k in ("colour", "shape", "both")}
    # on the 8-bit images as saved, with the one PIL -> [-1, 1] conversion the package has
    saved = [torch.stack([pil_to_pixels(im, *im.size) for im in images]) for images in (recon, sources)]
    report["mse"] = float(((saved[0] - saved[1]) ** 2).mean())
    blank = [Image.new("RGB", sources[0].size)] * columns  # pads a short last row: pairs stay aligned
    rows: list[Image.Image] = []
    for start in range(0, len(sources), columns):
        for images in (sources, recon):
            rows += (images[start : start + columns] + blank)[:columns]
    out_dir.mkdir(parents=True, exist_ok=True)
    make_grid([upscale_nearest(im, 64) for im in rows], columns=columns).save(out_dir / "eval_grid.png")
    report["grid"] = str(out_dir / "eval_grid.png")
    (out_dir / "eval.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report
