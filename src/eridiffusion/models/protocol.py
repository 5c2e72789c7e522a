"""The one interface the trainer and the sampler see.

Family differences (conditioning, latent space, objective) live behind :class:`ModelFamily`; the trainer and
the generator never branch on the family name. A family owns its modules and tells which of them may train.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

Conditioning = dict[str, torch.Tensor]
"""Named tensors produced by ``encode_prompt`` and consumed by ``predict`` (batch dimension first). The
training loop may add ``size_conditioning`` (B, 4: original h, original w, crop top, crop left) from the
data; families read only the entries they know, so only SDXL uses it."""


@dataclass(frozen=True)
class TrainBatchTarget:
    """What one training step regresses: inputs to the denoiser and the target with its per-sample weight."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    snr: torch.Tensor
    weight: torch.Tensor | None = None
    """Per-sample loss weight the objective itself prescribes (flow-matching loss weighting); None: 1."""


@runtime_checkable
class NoiseObjective(Protocol):
    """Forward process and regression target of a family (``epsilon`` / ``v_prediction`` / ``flow``)."""

    prediction_type: str
    num_train_timesteps: int

    def sample_timesteps(
        self, n: int, generator: torch.Generator, latent_shape: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """Training timesteps for ``n`` samples. ``latent_shape`` (C, H, W) of the batch lets resolution-
        dependent schedules (Flux's shift) follow the batch size in pixels; objectives may ignore it."""
        ...

    def fixed_timesteps(self, n: int, latent_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """``n`` timesteps spread over the training density (its evenly spaced quantiles), identical on
        every call: what a validation loss is measured at."""
        ...

    def make_target(
        self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> TrainBatchTarget: ...

    def scheduler_config(self) -> dict[str, Any]:
        """Keyword arguments for diffusers schedulers so sampling matches training."""
        ...

    def set_timesteps_kwargs(self, steps: int, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        """Extra ``scheduler.set_timesteps`` arguments for images of this latent shape (Flux's ``mu``)."""
        ...


@runtime_checkable
class ModelFamily(Protocol):
    """A text-to-image model: modules, conditioning, latent space and objective."""

    arch: str
    objective: NoiseObjective

    def modules(self) -> dict[str, nn.Module]:
        """Every module by component name (``denoiser``, ``text_encoder``...), for device moves and saving.

        Naming contract the data caches rely on: components whose name starts with ``text_encoder`` are
        used only by ``encode_prompt``; any other component except ``denoiser`` (e.g. ``vae``) only by
        ``encode_images`` / ``decode_latents``. Their weights identify cache entries, and once every batch
        comes from a cache they are moved off the training device.
        """
        ...

    def trainable_modules(self, train_text_encoder: bool) -> dict[str, nn.Module]:
        """The components a full fine-tune updates."""
        ...

    def default_resolution(self) -> int: ...

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """Channels, height, width of the denoiser input for an image of this size."""
        ...

    def check_size(self, height: int, width: int) -> None:
        """Raise ValueError naming the family's multiple when the size cannot be generated."""
        ...

    def size_multiple(self) -> int:
        """Image sides must be multiples of this (VAE factor x denoiser down-sampling / patching, e.g. 64
        for SD1.5/SDXL, 16 for SD3/Flux); aspect-ratio buckets are built from it."""
        ...

    def encode_prompt(self, prompts: list[str]) -> Conditioning: ...

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (B, 3, H, W) to denoiser space."""
        ...

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoiser space back to pixels in [-1, 1]."""
        ...

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor: ...

    def lora_key_names(self, component: str, module_path: str) -> tuple[str, str]:
        """(kohya key base, diffusers key base) of a layer, in the layouts this family's loaders expect,
        e.g. ``("lora_unet_mid_block_attentions_0_proj_in", "unet.mid_block.attentions.0.proj_in")``."""
        ...

    def save_pretrained(self, path: Path) -> None:
        """Write a self-describing folder that :func:`eridiffusion.models.load_family` reads back offline."""
        ...

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ModelFamily: ...


@runtime_checkable
class GuidanceEmbedding(Protocol):
    """Optional capability of guidance-distilled models (Flux.1 dev; Meng et al. 2023, "On Distillation of
    Guided Diffusion Models"): the guidance scale is an input of the denoiser, not two passes of
    classifier-free guidance. The sampler asks before running CFG."""

    def embedded_guidance(self, scale: float, n: int) -> Conditioning | None:
        """Conditioning entries carrying ``scale`` for ``n`` images, or None when this model has no guidance
        input (then the sampler runs ordinary classifier-free guidance)."""
        ...


@runtime_checkable
class ControlNetSupport(Protocol):
    """Optional capability of families with ControlNets (Zhang et al. 2023): load one for this model and
    compute its residuals for a denoiser call. The residuals are ``Conditioning`` entries that ``predict``
    adds to the denoiser's features; the sampler merges them into the step's conditioning (summing the
    entries of several ControlNets), so ``predict`` keeps one signature for every family."""

    def load_controlnet(self, path: Path) -> nn.Module:
        """A ControlNet that fits this model, from a local folder or file; raises naming the mismatch."""
        ...

    def prepare_control_image(self, controlnet: nn.Module, image: torch.Tensor) -> torch.Tensor:
        """The control image, pixels in [-1, 1] of shape (1, 3, H, W) at the output size, in the form
        ``controlnet`` takes it (UNet ControlNets: pixels in [0, 1]; transformer ones: latents). Runs once
        per sampling run, not per step."""
        ...

    def control_residuals(
        self,
        controlnet: nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        image: torch.Tensor,
        scale: float,
    ) -> Conditioning:
        """Residual entries for ``predict(noisy, timesteps, cond)``; ``image`` is the prepared control
        image expanded to the batch, ``scale`` multiplies every residual."""
        ...


@runtime_checkable
class SwappableBlocks(Protocol):
    """Optional capability of transformer families: the denoiser's repeated blocks, which block swap
    (``train.blocks_to_swap``) keeps on the host between uses. UNet families have no such list (their down
    and up blocks differ in size and feed each other through skip connections), so they lack it."""

    def swappable_blocks(self) -> list[nn.Module]:
        """The blocks in the order the denoiser's forward runs them, each called once per forward as a
        module (so hooks around its call see all of its work)."""
        ...


@runtime_checkable
class SingleFileExport(Protocol):
    """Optional capability: write the model as one ``.safetensors`` in its original (non-diffusers) layout,
    the file A1111/Forge/ComfyUI load as a checkpoint (``eri merge --out model.safetensors``)."""

    def save_single_file(self, path: Path) -> None: ...


@dataclass(frozen=True)
class FusedLayer:
    """A layer of a model's original (non-diffusers) layout, as adapter files trained on that layout name it,
    and the diffusers layers it is: one, or several joined along output rows in this order (BFL's fused
    q/k/v). ``swap_halves``: the original stores the two row halves in the other order (final adaLN)."""

    component: str
    module_paths: tuple[str, ...]
    swap_halves: bool = False


@runtime_checkable
class AdapterAliases(Protocol):
    """Optional capability: adapter layer names of the model's original layout (kohya's ``lora_unet_*``
    Flux/SD3 files use BFL's and Stability's fused module names), so those files load onto the diffusers
    modules the family runs; the adapter reader splits each fused layer's update by output rows."""

    def adapter_aliases(self) -> dict[str, FusedLayer]:
        """Layer names as files spell them, without the tensor suffix
        (``lora_unet_double_blocks_0_img_attn_qkv``, ``diffusion_model.double_blocks.0.img_attn.qkv``)
        -> the layers they stand for."""
        ...


def require_size_multiple(arch: str, factor: int, height: int, width: int) -> None:
    """The shared body of ``ModelFamily.check_size``: both sides positive multiples of ``factor``."""
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % factor:
            raise ValueError(f"{name} {value} must be a positive multiple of {factor} for {arch}")


def underscored_lora_names(kohya_prefix: str, diffusers_prefix: str, module_path: str) -> tuple[str, str]:
    """kohya's convention for models whose module names it shares (SD1.5 UNet, CLIP): dots -> underscores."""
    return f"{kohya_prefix}_{module_path.replace('.', '_')}", f"{diffusers_prefix}.{module_path}"


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's first floating-point parameter: what diffusers' and transformers' ``.dtype``
    return, without their walk over every parameter (7 ms per read on an SDXL UNet, read every step)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter (``.device`` of diffusers models walks them all)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
