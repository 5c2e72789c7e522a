"""Memory options for generation: attention slicing, VAE slicing / tiling, model CPU offload, fp16 VAE
upcast. Each trades a little speed (tiling: a little fidelity) for lower peak memory, so a model larger
than the GPU's free memory still generates.

Two kinds of option live here. *Model settings* (attention slicing, VAE tiling, CPU offload) change how a
loaded model runs, so :func:`apply_memory_options` applies them once, when the model enters the cache.
*Per-call settings* (VAE slicing, upcast) act on one decode, in :func:`decode`. We do not use diffusers
pipelines, so CPU offload is our own: forward pre-hooks that bring a component to the device just before it
runs and send the previous one back, in the order generation uses them (text encoders, denoiser, VAE).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from eridiffusion.models.protocol import ModelFamily

logger = logging.getLogger(__name__)

LOW_PRECISION = (torch.float16, torch.bfloat16)
_OFFLOADS: weakref.WeakKeyDictionary[Any, CpuOffload] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class MemoryOptions:
    """How to fit generation into less memory; the defaults change nothing but the fp16 VAE rescue."""

    attention_slicing: str | int | None = None
    """``auto`` (half the head dimension per slice), ``max`` (one head dimension at a time) or a slice
    size, for denoisers that support diffusers' ``set_attention_slice`` (UNets); None: off."""
    vae_slicing: bool = False
    """Decode a batch one image at a time: the VAE decoder's activations dominate peak memory at large
    sizes, and they grow with the batch."""
    vae_tiling: bool = False
    """Decode (and encode) large images in overlapping tiles (diffusers' tiled AutoencoderKL); tiles are
    blended, so the result is close to, not equal to, the untiled one."""
    vae_tile_size: int | None = None
    """Tile side in pixels; None: the VAE's ``sample_size`` (512 for SD1.5, 1024 for SDXL)."""
    cpu_offload: bool = False
    """Keep every component on the CPU and move each to the device only while it runs."""
    vae_upcast: bool = True
    """When an fp16/bf16 VAE decodes to NaN/inf (the SDXL VAE overflows in fp16), upcast it to fp32 and
    decode again; off: such a decode is an error."""

    def __post_init__(self) -> None:
        a = self.attention_slicing
        if a is not None and a not in ("auto", "max") and not (isinstance(a, int) and a > 0):
            raise ValueError(f"attention slicing must be 'auto', 'max' or a positive int, got {a!r}")
        if self.vae_tile_size is not None and self.vae_tile_size <= 0:
            raise ValueError(f"vae tile size must be positive, got {self.vae_tile_size}")


def parse_attention_slicing(value: str | None) -> str | int | None:
    """A command-line value: ``auto``, ``max``, a number, or ``off`` / none."""
    if value is None or value.lower() in ("", "off", "none"):
        return None
    return int(value) if value.isdigit() else value.lower()


def apply_memory_options(family: ModelFamily, options: MemoryOptions, device: torch.device) -> None:
    """Apply the model settings of ``options`` to a loaded ``family`` (once, before it is used).

    With ``cpu_offload`` the family must already be on the CPU; ``device`` is where each component runs."""
    modules = family.modules()
    if options.attention_slicing is not None:
        denoiser = modules["denoiser"]
        if hasattr(denoiser, "set_attention_slice"):
            denoiser.set_attention_slice(options.attention_slicing)
        else:
            logger.warning("%s's denoiser has no sliced attention; attention slicing ignored", family.arch)
    if options.vae_tiling:
        vaes = [m for m in modules.values() if hasattr(m, "enable_tiling")]
        if not vaes:
            logger.warning("%s has no tiled VAE; VAE tiling ignored", family.arch)
        for vae in vaes:
            vae.enable_tiling()
            if options.vae_tile_size is not None:
                factor = 2 ** (len(vae.config.block_out_channels) - 1)
                vae.tile_sample_min_size = options.vae_tile_size
                vae.tile_latent_min_size = max(1, options.vae_tile_size // factor)
    if options.cpu_offload:
        _OFFLOADS[family] = CpuOffload(modules, device)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to(v, device) for v in value)
    return value


@dataclass
class CpuOffload:
    """At most one component on ``device`` at a time; the others wait on the CPU.

    A forward pre-hook on each component (on each child of the VAE, whose ``encode`` / ``decode`` are not
    ``forward``) moves it to the device, the previous one back to the CPU, and the call's tensor arguments
    along, so families that place inputs by ``module.device`` before the call still work. On a CPU-only
    machine every move is a no-op and results are unchanged."""

    modules: dict[str, nn.Module]
    device: torch.device
    loads: list[str] = field(default_factory=list)
    """Components in the order they were brought to the device (for tests and debugging)."""
    resident: str | None = None

    def __post_init__(self) -> None:
        for name, module in self.modules.items():
            whole = name == "denoiser" or name.startswith("text_encoder")
            targets = [module] if whole else list(module.children()) or [module]
            for target in targets:
                target.register_forward_pre_hook(self._hook(name), with_kwargs=True)

    def _hook(self, name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            self.load(name)
            return _to(args, self.device), _to(kwargs, self.device)

        return hook

    def load(self, name: str) -> None:
        if self.resident == name:
            return
        if self.resident is not None:
            self.modules[self.resident].to("cpu")
        self.modules[name].to(self.device)
        self.resident = name
        self.loads.append(name)

    def release(self) -> None:
        """Send the resident component back to the CPU (after a generation, freeing the device)."""
        if self.resident is not None:
            self.modules[self.resident].to("cpu")
            self.resident = None


def offload_of(family: ModelFamily) -> CpuOffload | None:
    """The :class:`CpuOffload` hooked into ``family`` by :func:`apply_memory_options`, if any."""
    return _OFFLOADS.get(family)


def decode(family: ModelFamily, latents: torch.Tensor, options: MemoryOptions | None = None) -> torch.Tensor:
    """``family.decode_latents`` with VAE slicing and the fp16 upcast rescue of ``options``."""
    options = options or MemoryOptions()
    parts = latents.split(1) if options.vae_slicing else (latents,)
    pixels = torch.cat([family.decode_latents(p) for p in parts])
    if torch.isfinite(pixels).all():
        return pixels
    vae = family.modules().get("vae")
    dtype = next(vae.parameters()).dtype if vae is not None else torch.float32
    if vae is None or dtype not in LOW_PRECISION:
        raise ValueError("decoding gave NaN/inf; the sampled latents are out of the VAE's range")
    if not options.vae_upcast:
        raise ValueError(f"the {dtype} VAE overflowed (NaN/inf pixels); enable VAE upcast (fp32 decode)")
    # keep it in fp32 from now on, as diffusers does for VAEs marked force_upcast: the next decode of this
    # model would overflow the same way
    logger.warning("%s VAE overflowed in %s; upcasting it to fp32", family.arch, dtype)
    vae.float()
    return torch.cat([family.decode_latents(p) for p in parts])
