"""Text-to-image sampling over any :class:`~eridiffusion.models.ModelFamily`.

One small loop serves every scheduler: diffusers schedulers expose ``init_noise_sigma``,
``scale_model_input`` and ``step``, which covers DDIM-style and Karras/Euler-style samplers alike; flow
matching schedulers start from pure noise and scale nothing, so they lack the first two. The model's
objective adds its own ``set_timesteps`` arguments (Flux's resolution-dependent ``mu``), and guidance-
distilled models (:class:`~eridiffusion.models.protocol.GuidanceEmbedding`) take the guidance scale as an
input instead of running classifier-free guidance.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from eridiffusion.inference.samplers import check_sampler, make_scheduler, resolve_sampler
from eridiffusion.models.protocol import Conditioning, GuidanceEmbedding, ModelFamily


@dataclass
class GenerateRequest:
    prompts: list[str]
    negative_prompt: str = ""
    steps: int = 25
    guidance_scale: float = 4.0
    sampler: str = "ddim"
    seed: int = 0
    height: int | None = None
    width: int | None = None
    images_per_prompt: int = 1
    model_name: str = field(default="")

    def expanded_prompts(self) -> list[str]:
        return [p for p in self.prompts for _ in range(self.images_per_prompt)]


def _cat(a: Conditioning, b: Conditioning) -> Conditioning:
    return {k: torch.cat([a[k], b[k]]) for k in a}


def _check_timesteps(timesteps: torch.Tensor, req: GenerateRequest) -> None:
    """Karras sigmas on a schedule with a huge sigma_max (e.g. cosine) collapse onto repeated timesteps,
    which diffusers then steps past the end of; say so instead of crashing or sampling garbage."""
    if resolve_sampler(req.sampler).key != "heun":
        ts = timesteps.tolist()
        if len(set(ts)) != len(ts):
            raise ValueError(
                f"sampler {req.sampler!r} gives repeated timesteps with this model's noise schedule at "
                f"{req.steps} steps; pick another sampler (e.g. ddim, euler, dpmpp_2m)"
            )


def initial_noise(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """One CPU generator per image (seed, seed+1, ...) so image *i* reproduces alone, as in A1111."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


@torch.no_grad()
def sample(family: ModelFamily, req: GenerateRequest, device: torch.device | None = None) -> torch.Tensor:
    """Generate images for ``req``; returns pixels in [-1, 1] of shape (N, 3, H, W) on the CPU."""
    height = req.height or family.default_resolution()
    width = req.width or family.default_resolution()
    family.check_size(height, width)
    check_sampler(req.sampler, family.objective.prediction_type)
    device = device or next(iter(family.modules().values())).parameters().__next__().device
    prompts = req.expanded_prompts()
    n = len(prompts)
    latent_shape = family.latent_shape(height, width)
    scheduler = make_scheduler(req.sampler, family.objective.scheduler_config())
    extra = family.objective.set_timesteps_kwargs(req.steps, latent_shape)
    scheduler.set_timesteps(req.steps, device=device, **extra)
    _check_timesteps(scheduler.timesteps, req)
    seeds = [req.seed + i for i in range(n)]
    latents = initial_noise(latent_shape, seeds).to(device)
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    # ancestral/SDE samplers draw fresh noise each step: seed it too; deterministic ones take no generator
    step_kwargs = (
        {"generator": torch.Generator().manual_seed(req.seed)}
        if "generator" in inspect.signature(scheduler.step).parameters
        else {}
    )
    cond = family.encode_prompt(prompts)
    embedded = (
        family.embedded_guidance(req.guidance_scale, n) if isinstance(family, GuidanceEmbedding) else None
    )
    if embedded is not None:
        cond = {**cond, **{k: v.to(device) for k, v in embedded.items()}}
    use_cfg = embedded is None and req.guidance_scale != 1.0
    if use_cfg:
        cond = _cat(cond, family.encode_prompt([req.negative_prompt] * n))
    scales_input = hasattr(scheduler, "scale_model_input")
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(latents, t) if scales_input else latents
        if use_cfg:
            model_in = torch.cat([model_in, model_in])
        timesteps = t.expand(model_in.shape[0]).to(device)
        out = family.predict(model_in, timesteps, cond).float()
        if use_cfg:
            out_cond, out_uncond = out.chunk(2)
            out = out_uncond + req.guidance_scale * (out_cond - out_uncond)
        latents = scheduler.step(out, t, latents, **step_kwargs).prev_sample
    if not torch.isfinite(latents).all():
        raise ValueError(
            f"sampler {req.sampler!r} produced NaN/inf with this model; try ddim, euler or dpmpp_2m"
        )
    return family.decode_latents(latents).clamp(-1, 1).float().cpu()


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    arr = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def make_grid(images: list[Image.Image], columns: int) -> Image.Image:
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * w, rows * h), (0, 0, 0))
    for i, img in enumerate(images):
        grid.paste(img, ((i % columns) * w, (i // columns) * h))
    return grid


def a1111_parameters(req: GenerateRequest, prompt: str, seed: int, width: int, height: int) -> str:
    """The ``parameters`` text A1111, Forge and ComfyUI readers parse back from a PNG."""
    lines = [prompt]
    if req.negative_prompt:
        lines.append(f"Negative prompt: {req.negative_prompt}")
    fields = [
        f"Steps: {req.steps}",
        f"Sampler: {resolve_sampler(req.sampler).label}",
        f"CFG scale: {req.guidance_scale:g}",
        f"Seed: {seed}",
        f"Size: {width}x{height}",
    ]
    if req.model_name:
        fields.append(f"Model: {req.model_name}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def png_info(parameters: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    return info


def upscale_nearest(img: Image.Image, min_side: int = 128) -> Image.Image:
    """Tiny-model outputs are 32 px; grids are easier to see blown up without smoothing."""
    factor = max(1, int(np.ceil(min_side / min(img.size))))
    return img.resize((img.width * factor, img.height * factor), Image.NEAREST) if factor > 1 else img
