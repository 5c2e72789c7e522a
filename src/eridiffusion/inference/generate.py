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
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from torch import nn

from eridiffusion.inference.controlnet import Control, ControlUnit
from eridiffusion.inference.inpaint import InpaintOptions, fill_latents
from eridiffusion.inference.inpaint import prepare as prepare_inpaint
from eridiffusion.inference.memory import MemoryOptions, decode
from eridiffusion.inference.samplers import check_sampler, make_scheduler, precise_sigmas, resolve_sampler
from eridiffusion.models.prompt_chunks import ChunkedPrompts
from eridiffusion.models.prompts import find_truncations
from eridiffusion.models.protocol import Conditioning, GuidanceEmbedding, ModelFamily

logger = logging.getLogger(__name__)


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
    init_image: torch.Tensor | None = None
    """img2img / inpaint: the start image, pixels in [-1, 1] of shape (3, height, width)."""
    strength: float = 0.75
    """img2img: the fraction of the schedule run from the noised start image (A1111's denoising strength;
    1.0 keeps only the start image's composition in the masked area, 0.0 would run no step)."""
    mask: torch.Tensor | None = None
    """inpaint: (1, height, width) in [0, 1]; 1 is repainted, 0 keeps the start image."""
    inpaint: InpaintOptions | None = None
    """A1111's inpaint options (mask blur, fill, only-masked); applied by :func:`generate_pixels`."""
    seeds: list[int] | None = None
    """One seed per expanded prompt, when several requests share one batch; default seed, seed+1, ..."""
    model_name: str = field(default="")
    controls: list[ControlUnit] = field(default_factory=list)
    """ControlNet units; their models are loaded by the caller and passed to :func:`sample`."""
    long_prompts: str = "truncate"
    """``truncate`` (cut at each encoder's limit, with a warning) or ``chunk`` (A1111's 75-token chunks;
    SD1.5/SDXL)."""

    def expanded_prompts(self) -> list[str]:
        return [p for p in self.prompts for _ in range(self.images_per_prompt)]

    def image_seeds(self) -> list[int]:
        n = len(self.prompts) * self.images_per_prompt
        if self.seeds is not None:
            if len(self.seeds) != n:
                raise ValueError(f"{len(self.seeds)} seeds for {n} images")
            return list(self.seeds)
        return [self.seed + i for i in range(n)]


def _cat(a: Conditioning, b: Conditioning) -> Conditioning:
    return {k: torch.cat([a[k], b[k]]) for k in a}


def _check_timesteps(scheduler: Any, req: GenerateRequest) -> None:
    """Karras sigmas (Karras et al. 2022) run from the schedule's largest sigma down with rho=7, which
    crowds steps near sigma_max. On a schedule whose last training step has a huge sigma (cosine: ~2e4)
    most steps then map to the same discrete timestep, which diffusers steps past the end of. Refuse with
    the reason before any work, instead of crashing or sampling garbage. (Heun repeats timesteps by
    design: two evaluations per step.)"""
    if resolve_sampler(req.sampler).key == "heun":
        return
    ts = scheduler.timesteps.tolist()
    if len(set(ts)) != len(ts):
        sigmas = getattr(scheduler, "sigmas", None)
        top = f" (sigma_max {float(sigmas.max()):.3g})" if sigmas is not None else ""
        raise ValueError(
            f"sampler {req.sampler!r} gives repeated timesteps with this model's noise schedule{top} at "
            f"{req.steps} steps: Karras spacing crowds the steps near "
            "sigma_max, which this schedule's last training step makes huge; use the same sampler without "
            "Karras (e.g. dpmpp_2m) or ddim / euler"
        )


def _noised(scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x0`` at noise level ``t`` as this scheduler's sampler expects it: flow schedulers interpolate
    (``scale_noise``), the DDPM family scale by sigma / alpha-bar (``add_noise``)."""
    ts = t.reshape(1).expand(x0.shape[0])
    if hasattr(scheduler, "scale_noise"):
        return scheduler.scale_noise(x0, ts, noise)
    return scheduler.add_noise(x0, noise, ts)


def _start_from_image(
    family: ModelFamily,
    scheduler: Any,
    req: GenerateRequest,
    init_image: torch.Tensor,
    noise: torch.Tensor,
    size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """img2img (SDEdit, Meng et al. 2022): skip the first ``1 - strength`` of the schedule and start from
    the encoded image noised to the first remaining step. Returns (timesteps, latents, clean latents)."""
    if tuple(init_image.shape) != (3, *size):
        raise ValueError(f"init image is {tuple(init_image.shape[1:])} (h, w) but the request is {size}")
    if req.mask is not None and tuple(req.mask.shape) != (1, *size):
        raise ValueError(f"mask is {tuple(req.mask.shape[1:])} (h, w) but the request is {size}")
    if not 0.0 < req.strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {req.strength}")
    skip = req.steps - min(int(req.steps * req.strength), req.steps)
    if skip == req.steps:
        raise ValueError(f"strength {req.strength} x {req.steps} steps runs no step; raise either")
    order = getattr(scheduler, "order", 1)
    timesteps = scheduler.timesteps[skip * order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(skip * order)
    x0 = family.encode_images(init_image[None].to(noise.device)).float()
    x0 = x0.expand(noise.shape[0], *x0.shape[1:])
    return timesteps, _noised(scheduler, x0, noise, timesteps[:1]), x0


def image_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image (seed, seed+1, ...): it draws the image's initial noise and then, for
    ancestral/SDE samplers, the fresh noise of every step, so image *i* of a batch is the image generated
    alone with its seed (as A1111 seeds each image's sampler noise)."""
    return [torch.Generator().manual_seed(s) for s in seeds]


def initial_noise(
    shape: tuple[int, ...], seeds: list[int], generators: list[torch.Generator] | None = None
) -> torch.Tensor:
    """Each image's starting noise from its own generator (made from ``seeds`` unless given)."""
    generators = generators if generators is not None else image_generators(seeds)
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


@dataclass(frozen=True)
class Preview:
    """Live preview: every ``every`` steps, ``callback(step_done, pixels)`` gets the decoded current
    estimate of the final images (N, 3, H, W) in [-1, 1]; a full VAE decode, so keep ``every`` large on
    big models."""

    every: int
    callback: Callable[[int, torch.Tensor], None]

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"preview every {self.every} steps: must be >= 1")


StepCallback = Callable[[int, int], None]
"""Called as ``(step_done, total_steps)`` after every denoising step; raising from it stops sampling, which
is how a server reports progress and interrupts a running job without threads killing each other."""


def encode_prompts(
    family: ModelFamily, prompts: list[str], negative: str | None, long_prompts: str = "truncate"
) -> Conditioning:
    """The prompts' conditioning, followed by the negative prompt's for each (classifier-free guidance)
    when ``negative`` is given. ``long_prompts``: ``truncate`` cuts at each encoder's limit (with a
    warning), ``chunk`` encodes longer prompts A1111's way (SD1.5/SDXL only)."""
    if long_prompts not in ("truncate", "chunk"):
        raise ValueError(f"long_prompts {long_prompts!r}: choose truncate or chunk")
    if long_prompts == "truncate":
        _warn_truncation(family, prompts, negative)
        cond = family.encode_prompt(prompts)
        return _cat(cond, family.encode_prompt([negative] * len(prompts))) if negative is not None else cond
    if not isinstance(family, ChunkedPrompts):
        raise ValueError(
            f"long_prompts chunk is for SD1.5/SDXL (CLIP) models; a {family.arch} model cuts prompts at its "
            "limit (use long_prompts truncate)"
        )
    with family.chunked_prompts():
        # one batch: a prompt and its negative get the same number of chunks, as A1111 pads them
        return family.encode_prompt(prompts + ([negative] * len(prompts) if negative is not None else []))


def _warn_truncation(family: ModelFamily, prompts: list[str], negative: str | None) -> None:
    for what, texts in (("prompts", prompts), ("negative prompts", [negative] if negative else [])):
        for truncation in find_truncations(family, texts):
            logger.warning("%s cut: %s", what, truncation.message(what))


class StopEarly(Exception):
    """Raised by a :data:`StepCallback` to end sampling now and return the images as they are: the
    latest x0 estimate, decoded (A1111's ``/interrupt``, which answers with the partial images). Any
    other exception from the callback abandons the images."""


@torch.no_grad()
def sample(
    family: ModelFamily,
    req: GenerateRequest,
    device: torch.device | None = None,
    on_step: StepCallback | None = None,
    controlnets: Mapping[str, nn.Module] | None = None,
    memory: MemoryOptions | None = None,
    preview: Preview | None = None,
) -> torch.Tensor:
    """Generate images for ``req``; returns pixels in [-1, 1] of shape (N, 3, H, W) on the CPU.

    ``memory`` sets the decode's VAE slicing and fp16 upcast (model-wide options are applied when the
    model is loaded, see :mod:`eridiffusion.inference.memory`); ``preview`` receives decoded estimates.

    ``controlnets`` maps each ``req.controls`` unit's ``model`` to the loaded ControlNet; each step adds
    the residuals of the units active then, on the conditional and unconditional halves alike."""
    height = req.height or family.default_resolution()
    width = req.width or family.default_resolution()
    family.check_size(height, width)
    check_sampler(req.sampler, family.objective.prediction_type)
    device = device or next(iter(family.modules().values())).parameters().__next__().device
    control = (
        Control(family, req.controls, controlnets or {}, (height, width), device) if req.controls else None
    )
    prompts = req.expanded_prompts()
    n = len(prompts)
    latent_shape = family.latent_shape(height, width)
    scheduler = make_scheduler(req.sampler, family.objective.scheduler_config())
    extra = family.objective.set_timesteps_kwargs(req.steps, latent_shape)
    scheduler.set_timesteps(req.steps, device=device, **extra)
    _check_timesteps(scheduler, req)
    precise_sigmas(scheduler)
    seeds = req.image_seeds()
    generators = image_generators(seeds)
    noise = initial_noise(latent_shape, seeds, generators).to(device)
    schedule, x0, keep = scheduler.timesteps, None, None
    if req.init_image is None:
        if req.mask is not None:
            raise ValueError("a mask needs an init image to inpaint")
        latents = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    else:
        schedule, latents, x0 = _start_from_image(
            family, scheduler, req, req.init_image, noise, (height, width)
        )
        if req.mask is not None:
            # the mask at latent resolution; outside it the known image, noised to the current step,
            # replaces the sample after every step (the "legacy" inpainting of SD's first releases)
            # (rounded, as A1111 does: a blurred mask softens the pasted seam, not the latent boundary)
            latent_mask = torch.nn.functional.interpolate(req.mask[None].float(), size=latent_shape[1:])
            keep = 1 - latent_mask.to(device).round()
            if req.inpaint is not None and req.inpaint.fill in ("latent_noise", "latent_nothing"):
                x0 = fill_latents(x0, noise, keep, req.inpaint)
                latents = _noised(scheduler, x0, noise, schedule[:1])
    # ancestral/SDE samplers draw fresh noise each step, image i from its own generator (diffusers draws
    # one slice per generator of a list); deterministic ones take no generator
    step_kwargs = (
        {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    )
    embedded = (
        family.embedded_guidance(req.guidance_scale, n) if isinstance(family, GuidanceEmbedding) else None
    )
    use_cfg = embedded is None and req.guidance_scale != 1.0
    cond = encode_prompts(family, prompts, req.negative_prompt if use_cfg else None, req.long_prompts)
    if embedded is not None:
        cond = {**cond, **{k: v.to(device) for k, v in embedded.items()}}
    scales_input = hasattr(scheduler, "scale_model_input")
    total = len(schedule)
    for i, t in enumerate(schedule):
        model_in = scheduler.scale_model_input(latents, t) if scales_input else latents
        if use_cfg:
            model_in = torch.cat([model_in, model_in])
        timesteps = t.expand(model_in.shape[0]).to(device)
        step_cond = (
            cond if control is None else {**cond, **control.residuals(model_in, timesteps, cond, i, total)}
        )
        out = family.predict(model_in, timesteps, step_cond).float()
        if use_cfg:
            out_cond, out_uncond = out.chunk(2)
            out = out_uncond + req.guidance_scale * (out_cond - out_uncond)
        stepped = scheduler.step(out, t, latents, **step_kwargs)
        latents = stepped.prev_sample
        estimate = getattr(stepped, "pred_original_sample", None)
        if keep is not None and x0 is not None:
            known = x0 if i + 1 == total else _noised(scheduler, x0, noise, schedule[i + 1])
            latents = keep * known + (1 - keep) * latents
        if preview is not None and (i + 1) % preview.every == 0 and i + 1 < total:
            _preview(family, preview, i + 1, estimate, latents, memory)
        if on_step is not None:
            try:
                on_step(i + 1, total)
            except StopEarly:
                if i + 1 < total and estimate is not None:
                    latents = estimate if keep is None or x0 is None else keep * x0 + (1 - keep) * estimate
                break
    if not torch.isfinite(latents).all():
        others = [k for k in ("ddim", "euler", "dpmpp_2m") if k != resolve_sampler(req.sampler).key]
        raise ValueError(
            f"sampler {req.sampler!r} produced NaN/inf with this model (CFG scale {req.guidance_scale:g}); "
            f"try {' or '.join(others)}, or a lower CFG scale"
        )
    return decode(family, latents, memory).clamp(-1, 1).float().cpu()


def _preview(
    family: ModelFamily,
    preview: Preview,
    step: int,
    estimate: torch.Tensor | None,
    latents: torch.Tensor,
    memory: MemoryOptions | None,
) -> None:
    """Decode the scheduler's own x0 estimate where it gives one (DDIM, Euler...), else the noisy sample.
    An early estimate may be far out of range; a preview that fails to decode is skipped, never the job."""
    try:
        pixels = decode(family, latents if estimate is None else estimate, memory)
    except ValueError:
        return
    preview.callback(step, pixels.clamp(-1, 1).float().cpu())


def generate_pixels(
    family: ModelFamily,
    req: GenerateRequest,
    device: torch.device | None = None,
    on_step: StepCallback | None = None,
    controlnets: Mapping[str, nn.Module] | None = None,
    memory: MemoryOptions | None = None,
    preview: Preview | None = None,
) -> torch.Tensor:
    """:func:`sample`, wrapped in A1111's inpainting pre- and post-processing when ``req.inpaint`` is set
    (mask blur, fill, only-masked crop before; the paste over the start image after)."""
    if req.inpaint is None or req.mask is None or req.init_image is None:
        return sample(family, req, device, on_step, controlnets, memory, preview)
    plan = prepare_inpaint(req.init_image, req.mask, req.inpaint)
    controls = req.controls
    if plan.box is not None:
        size = (req.init_image.shape[1], req.init_image.shape[2])
        controls = [u.cropped(plan.box, size) for u in req.controls]
    inner = replace(req, init_image=plan.init_image, mask=plan.mask, controls=controls)
    return plan.paste(sample(family, inner, device, on_step, controlnets, memory, preview)).clamp(-1, 1)


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


def a1111_parameters(
    req: GenerateRequest, prompt: str, seed: int, width: int, height: int, lora_hashes: str = ""
) -> str:
    """The ``parameters`` text A1111, Forge and ComfyUI readers parse back from a PNG. ``prompt`` keeps its
    ``<lora:...>`` tags and ``lora_hashes`` is A1111's ``name: shorthash, ...``, so the image reproduces."""
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
    if lora_hashes:
        fields.append(f'Lora hashes: "{lora_hashes}"')
    fields.extend(u.infotext(i) for i, u in enumerate(req.controls))
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
