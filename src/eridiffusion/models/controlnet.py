"""ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"): loading
diffusers ControlNet weights offline and carrying their residuals to the denoiser.

A UNet ControlNet is a trainable copy of the UNet's encoder that sees a control image (edges, depth,
pose...) and returns one residual per UNet skip connection plus one for the middle block; the UNet adds them
to its own features. Transformer ControlNets (SD3, Flux) return one residual per transformer block. The
residuals travel to :meth:`~eridiffusion.models.protocol.ModelFamily.predict` inside the ``Conditioning``
dict under named keys, so ``predict`` keeps its one signature and the sampler sums several ControlNets key
by key without knowing what the keys mean.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import load_file

from eridiffusion.models.protocol import Conditioning

DOWN_KEY = "controlnet_down_"
"""``controlnet_down_{i}``: the residual added to the UNet's i-th skip connection."""
MID_KEY = "controlnet_mid"
"""The residual added to the UNet's middle-block output."""


def pack_unet_residuals(down: tuple[torch.Tensor, ...], mid: torch.Tensor) -> Conditioning:
    """A ControlNet's outputs as ``Conditioning`` entries (see the module docstring)."""
    return {**{f"{DOWN_KEY}{i}": d for i, d in enumerate(down)}, MID_KEY: mid}


def unet_residual_kwargs(cond: Conditioning, dtype: torch.dtype) -> dict[str, object]:
    """The UNet's ``down_block_additional_residuals`` / ``mid_block_additional_residual`` arguments for the
    residuals in ``cond``; empty when no ControlNet is active this step."""
    if MID_KEY not in cond:
        return {}
    n = sum(1 for k in cond if k.startswith(DOWN_KEY))
    return {
        "down_block_additional_residuals": tuple(cond[f"{DOWN_KEY}{i}"].to(dtype) for i in range(n)),
        "mid_block_additional_residual": cond[MID_KEY].to(dtype),
    }


def pack_blocks(prefix: str, blocks: list[torch.Tensor] | tuple[torch.Tensor, ...] | None) -> Conditioning:
    """A transformer ControlNet's per-block outputs as ``{prefix}{i}`` entries (SD3: one list; Flux: one
    for the double-stream and one for the single-stream blocks)."""
    return {f"{prefix}{i}": b for i, b in enumerate(blocks or ())}


def unpack_blocks(cond: Conditioning, prefix: str, dtype: torch.dtype) -> list[torch.Tensor] | None:
    """The per-block residuals under ``prefix`` in ``cond``, in the denoiser's dtype; None when absent."""
    n = sum(1 for k in cond if k.startswith(prefix))
    return [cond[f"{prefix}{i}"].to(dtype) for i in range(n)] or None


def load_transformer_controlnet(path: Path, kind: type[ModelMixin], dtype: torch.dtype) -> ModelMixin:
    """A diffusers ControlNet folder of class ``kind`` (``SD3ControlNetModel``, ``FluxControlNetModel``),
    offline. Single files of these have no common layout to infer a config from, so only folders load."""
    if not path.exists():
        raise FileNotFoundError(f"ControlNet '{path}' does not exist")
    config = path / "config.json"
    if not path.is_dir() or not config.is_file():
        raise ValueError(
            f"ControlNet '{path}': a {kind.__name__} loads from a diffusers folder (config.json + weights)"
        )
    found = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
    if found != kind.__name__:
        raise ValueError(f"'{path}' is a {found}, not a {kind.__name__} for this model")
    # imported here: stable_diffusion imports this module for its families' ControlNet support
    from eridiffusion.models.stable_diffusion import weights_variant

    return kind.from_pretrained(path, torch_dtype=dtype, variant=weights_variant(path)).eval()


def _check_fits(controlnet: ControlNetModel, unet: UNet2DConditionModel, source: Path) -> None:
    """A ControlNet trained for another base model fails deep inside the UNet with a shape error; name the
    likely cause instead (an SD1.5 ControlNet on SDXL is the usual one)."""
    for key in ("cross_attention_dim", "in_channels", "addition_embed_type", "block_out_channels"):
        theirs, ours = controlnet.config.get(key), unet.config.get(key)
        if isinstance(ours, list | tuple):
            theirs, ours = list(theirs or []), list(ours)
        if key == "block_out_channels" and theirs[: len(ours)] == ours:
            continue
        if theirs != ours:
            raise ValueError(
                f"ControlNet '{source}' was made for another base model: its {key} is {theirs}, this "
                f"model's UNet has {ours} (e.g. an SD1.5 ControlNet on SDXL?)"
            )


def load_unet_controlnet(path: Path, unet: UNet2DConditionModel, dtype: torch.dtype) -> ControlNetModel:
    """A ControlNet for ``unet``, fully offline, from:

    * a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``);
    * a single ``.safetensors`` file, in diffusers' layout or the original one (``input_hint_block``,
      ``zero_convs``, optionally under ``control_model.``) as A1111's extension loads them. A single file
      carries no config, so its architecture is taken from ``unet`` (a ControlNet is a copy of the UNet's
      encoder); smaller variants (SDXL "mid"/"small") need their diffusers folder.
    """
    if not path.exists():
        raise FileNotFoundError(f"ControlNet '{path}' does not exist")
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"ControlNet folder '{path}' has no config.json (a diffusers ControlNet)")
        kind = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
        if kind != "ControlNetModel":
            raise ValueError(f"'{path}' is a {kind}, not a UNet ControlNet (ControlNetModel)")
        # imported here: stable_diffusion imports this module for its families' ControlNet support
        from eridiffusion.models.stable_diffusion import weights_variant

        model = ControlNetModel.from_pretrained(path, torch_dtype=dtype, variant=weights_variant(path))
    elif path.suffix == ".safetensors":
        model = _from_single_file(path, unet)
    else:
        raise ValueError(f"ControlNet '{path}' is neither a diffusers folder nor a .safetensors file")
    _check_fits(model, unet, path)
    return model.to(dtype).eval()


def _from_single_file(path: Path, unet: UNet2DConditionModel) -> ControlNetModel:
    state = load_file(str(path))
    with init_empty_weights():
        model = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    if not any(k.startswith("controlnet_cond_embedding.") for k in state):
        if not any("input_hint_block." in k for k in state):
            raise ValueError(
                f"'{path}' holds no ControlNet weights (neither controlnet_cond_embedding.* nor "
                "input_hint_block.*): a LoRA, a checkpoint, or a T2I-Adapter?"
            )
        converted = convert_controlnet_checkpoint(state, dict(model.config))
        state = {k: v for k, v in converted.items() if v is not None}
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"ControlNet '{path}' does not match this model's UNet: {len(missing)} weights missing (e.g. "
            f"{missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); if it is a smaller "
            "variant, load its diffusers folder (config.json + weights) instead"
        )
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"ControlNet '{path}' does not match this model's UNet: {exc}") from None
    return model
