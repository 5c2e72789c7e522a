"""The diffusers layout of SD1.5 / SDXL / SD3 weights turned back into the original single-file (LDM) layout
that A1111, Forge and ComfyUI load: the reverse of diffusers' single-file conversion, key by key."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

if TYPE_CHECKING:
    from eridiffusion.models.stable_diffusion import StableDiffusionFamily

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."


_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _resnet_to_ldm(rest: str) -> str:
    layer, _, tail = rest.partition(".")
    return f"{_RESNET_TO_LDM.get(layer, layer)}.{tail}"


def unet_key_to_ldm(key: str, config: dict[str, Any]) -> str:
    """One diffusers ``UNet2DConditionModel`` name (``...resnets.0.conv1.weight``) -> the original one
    (without ``model.diffusion_model.``). kohya names SDXL LoRA layers this way too.

    The block numbering follows the original UNet: ``input_blocks`` count ``layers_per_block`` resnets
    (+ attention) per level plus one downsampler, ``output_blocks`` ``layers_per_block + 1`` per level.
    """
    lpb = int(config["layers_per_block"])
    simple = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if config.get("addition_embed_type") == "text_time":
        simple.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    parts = key.split(".")
    if key in simple:
        return simple[key]
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 4:
        b, kind, i, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        down = parts[0] == "down_blocks"
        first = 1 + b * (lpb + 1) if down else b * (lpb + 1)
        blocks = "input_blocks" if down else "output_blocks"
        if kind == "resnets":
            return f"{blocks}.{first + i}.0.{_resnet_to_ldm(rest)}"
        if kind == "attentions":
            return f"{blocks}.{first + i}.1.{rest}"
        if kind == "downsamplers":
            return f"input_blocks.{(b + 1) * (lpb + 1)}.0.op.{rest.removeprefix('conv.')}"
        if kind == "upsamplers":  # after the attention when the level has one
            slot = 2 if "CrossAttn" in config["up_block_types"][b] else 1
            return f"output_blocks.{first + lpb}.{slot}.{rest}"
    if parts[0] == "mid_block" and len(parts) > 3:
        kind, i, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        return (
            f"middle_block.{2 * i}.{_resnet_to_ldm(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
        )
    raise ValueError(f"no original-layout name for UNet weight {key!r}")


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers ``UNet2DConditionModel`` weights -> ``model.diffusion_model.*`` (SD1.x/SDXL layout)."""
    return {LDM_UNET_PREFIX + unet_key_to_ldm(k, config): v for k, v in state.items()}


_VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` keys -> ``first_stage_model.*``; attention projections become the 1x1
    convolutions of the original (diffusers squeezes them into linears when loading)."""
    simple = {d: ldm for d, ldm in DIFFUSERS_TO_LDM_MAPPING["vae"].items()}
    n_up = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if key in simple:
            new = simple[key]
        elif parts[1] == "down_blocks":  # encoder.down_blocks.i.(resnets.j|downsamplers.0).*
            i, rest = int(parts[2]), ".".join(parts[3:])
            if rest.startswith("resnets."):
                j, tail = rest.split(".", 2)[1:]
                new = f"encoder.down.{i}.block.{j}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                new = f"encoder.down.{i}.downsample.{rest.removeprefix('downsamplers.0.')}"
        elif parts[1] == "up_blocks":  # decoder.up_blocks.i: the original counts levels bottom-up
            i, rest = n_up - 1 - int(parts[2]), ".".join(parts[3:])
            if rest.startswith("resnets."):
                j, tail = rest.split(".", 2)[1:]
                new = f"decoder.up.{i}.block.{j}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                new = f"decoder.up.{i}.upsample.{rest.removeprefix('upsamplers.0.')}"
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            tail = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
            new = f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{tail}"
        elif parts[1] == "mid_block" and parts[2] == "attentions":
            layer, param = ".".join(parts[4:-1]), parts[-1]
            new = f"{parts[0]}.mid.attn_1.{_VAE_ATTENTION_TO_LDM[layer]}.{param}"
            if value.dim() == 2:
                value = value[:, :, None, None]
        else:
            raise ValueError(f"no original-layout name for VAE weight {key!r}")
        out[LDM_VAE_PREFIX + new] = value
    return out


_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIP text keys under ``prefix`` in the original ``text_model.*`` naming."""
    return {
        f"{prefix}text_model.{k.removeprefix('text_model.')}": v
        for k, v in state.items()
        if not k.endswith("position_ids") and not k.startswith("text_projection")
    }


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers ``CLIPTextModelWithProjection`` -> OpenCLIP's layout (fused qkv ``in_proj``,
    ``resblocks``, ``text_projection`` applied as ``x @ P``), as SDXL's ``conditioner.embedders.1``."""
    flat = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    out = {
        "positional_embedding": flat.pop("embeddings.position_embedding.weight"),
        "token_embedding.weight": flat.pop("embeddings.token_embedding.weight"),
        "ln_final.weight": flat.pop("final_layer_norm.weight"),
        "ln_final.bias": flat.pop("final_layer_norm.bias"),
        "text_projection": flat.pop("text_projection.weight").T.contiguous(),
    }
    layers = sorted({int(k.split(".")[2]) for k in flat if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{param}"] = torch.cat(
                [flat.pop(f"{src}self_attn.{p}_proj.{param}") for p in ("q", "k", "v")]
            )
            for ours, theirs in _OPEN_CLIP_LAYER.items():
                out[f"{dst}{theirs}.{param}"] = flat.pop(f"{src}{ours}.{param}")
    if flat:
        raise ValueError(f"no OpenCLIP name for text encoder weights {sorted(flat)[:3]}")
    return {prefix + k: v for k, v in out.items()}


def to_ldm_state_dict(family: StableDiffusionFamily) -> dict[str, torch.Tensor]:
    """The whole model in the original single-file layout (the inverse of the single-file loader)."""
    out = unet_to_ldm(family.unet.state_dict(), dict(family.unet.config))
    out.update(vae_to_ldm(family.vae.state_dict(), dict(family.vae.config)))
    for slot in family.text_slots:
        state = family.text_encoders[slot.module].state_dict()
        convert = open_clip_to_ldm if slot.open_clip else clip_to_ldm
        out.update(convert(state, slot.ldm_prefix))
    return out
