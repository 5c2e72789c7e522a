"""Flux.1 (dev, schnell): a double/single-stream transformer over 2x2-packed 16-channel latents,
conditioned on T5-XXL token embeddings and CLIP-L's pooled output.

Choices, following BFL's reference code and diffusers' ``FluxPipeline``:

* **latents stay unpacked** ``(B, 16, H/8, W/8)`` everywhere the trainer and sampler see them
  (:meth:`FluxFamily.latent_shape`): noise is drawn in that shape, so a seed gives the same image as
  diffusers' pipeline, and losses are unchanged because packing only permutes elements. ``predict`` packs
  each 2x2 latent patch into one 64-d token, builds the RoPE position ids (``img_ids`` = (0, row, col) per
  token, ``txt_ids`` = 0) and unpacks the output;
* **timesteps**: the transformer takes sigma in [0, 1] (it multiplies by 1000 itself), so ``predict``
  divides the flow objective's sigma x 1000 by 1000;
* **guidance**: dev is guidance-distilled -- the guidance scale is an input (``guidance_embeds``), so
  sampling feeds the scale there instead of running classifier-free guidance, and training feeds
  ``model.options.train_guidance`` (1.0, as ai-toolkit and SimpleTuner do); schnell has no guidance input;
* **shift**: dev shifts timesteps by exp(mu) with mu linear in the image token count (resolution
  dependent), for training and sampling; schnell uses no shift;
* **single files** use BFL's layout (``double_blocks``, ``single_blocks``, ``img_in``, ``guidance_in``...),
  optionally under ``model.diffusion_model.`` with a ``vae.``/``first_stage_model.`` VAE and
  ``text_encoders.*`` as ComfyUI saves them; :func:`flux_rules` converts both ways for any width (diffusers'
  converter assumes the 3072-wide release).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxControlNetModel, FluxTransformer2DModel
from diffusers.models.modeling_utils import ModelMixin
from pydantic import Field
from torch import nn
from transformers import CLIPTextModel, T5EncoderModel

from eridiffusion.models.controlnet import load_transformer_controlnet, pack_blocks, unpack_blocks
from eridiffusion.models.flow_common import (
    FlowOptions,
    FlowTransformerFamily,
)
from eridiffusion.models.flow_text import EncoderSlot
from eridiffusion.models.key_rules import KeyRule, linear_rules, rules_from_original, rules_to_original
from eridiffusion.models.protocol import Conditioning, module_dtype

CONTROL_DOUBLE_KEY = "controlnet_double_"
"""``controlnet_double_{i}``: a ControlNet's residual for the i-th double-stream block."""
CONTROL_SINGLE_KEY = "controlnet_single_"
"""``controlnet_single_{i}``: a ControlNet's residual for the i-th single-stream block."""

SLOTS = (
    EncoderSlot(
        "text_encoder",
        "tokenizer",
        "clip",
        CLIPTextModel,
        "clip_l_path",
        "text_encoders.clip_l.transformer.",
        "lora_te1",
        trainable=True,
    ),
    EncoderSlot(
        "text_encoder_2",
        "tokenizer_2",
        "t5",
        T5EncoderModel,
        "t5_path",
        "text_encoders.t5xxl.transformer.",
        "lora_te3",
        trainable=False,
    ),
)


class FluxOptions(FlowOptions):
    """``model.options`` of flux: the shared flow options plus the guidance fed while training dev."""

    train_guidance: float = Field(
        default=1.0, ge=0, description="guidance-embedding input during training (dev only)"
    )


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch becomes one token, row-major, as in Flux."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for a (height, width) latent."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def latent_image_ids(rows: int, cols: int, device: torch.device | None = None) -> torch.Tensor:
    """RoPE position ids of the packed tokens: (0, row, col) per token, row-major, shape (rows*cols, 3)."""
    ids = torch.zeros(rows, cols, 3, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return ids.reshape(rows * cols, 3)


def _block_count(state: dict[str, torch.Tensor], prefix: str) -> int:
    found = {int(k.split(".")[1]) for k in state if k.startswith(prefix)}
    return max(found) + 1 if found else 0


def flux_rules(num_layers: int, num_single_layers: int) -> list[KeyRule]:
    """BFL's names <-> diffusers' ``FluxTransformer2DModel`` names, one rule per tensor (the guidance
    embedder's rules simply find nothing for schnell)."""
    rules = [
        *linear_rules("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
        *linear_rules("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
        *linear_rules("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        *linear_rules("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
        *linear_rules("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
        *linear_rules("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
        *linear_rules("txt_in", "context_embedder"),
        *linear_rules("img_in", "x_embedder"),
        *linear_rules("final_layer.linear", "proj_out"),
        *linear_rules("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True),
    ]
    for i in range(num_layers):
        o, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        rules += [
            *linear_rules(f"{o}.img_mod.lin", f"{d}.norm1.linear"),
            *linear_rules(f"{o}.txt_mod.lin", f"{d}.norm1_context.linear"),
            *linear_rules(f"{o}.img_attn.qkv", tuple(f"{d}.attn.to_{p}" for p in "qkv")),
            *linear_rules(f"{o}.txt_attn.qkv", tuple(f"{d}.attn.add_{p}_proj" for p in "qkv")),
            *linear_rules(f"{o}.img_attn.proj", f"{d}.attn.to_out.0"),
            *linear_rules(f"{o}.txt_attn.proj", f"{d}.attn.to_add_out"),
            *linear_rules(f"{o}.img_mlp.0", f"{d}.ff.net.0.proj"),
            *linear_rules(f"{o}.img_mlp.2", f"{d}.ff.net.2"),
            *linear_rules(f"{o}.txt_mlp.0", f"{d}.ff_context.net.0.proj"),
            *linear_rules(f"{o}.txt_mlp.2", f"{d}.ff_context.net.2"),
            KeyRule(f"{o}.img_attn.norm.query_norm.scale", (f"{d}.attn.norm_q.weight",)),
            KeyRule(f"{o}.img_attn.norm.key_norm.scale", (f"{d}.attn.norm_k.weight",)),
            KeyRule(f"{o}.txt_attn.norm.query_norm.scale", (f"{d}.attn.norm_added_q.weight",)),
            KeyRule(f"{o}.txt_attn.norm.key_norm.scale", (f"{d}.attn.norm_added_k.weight",)),
        ]
    for i in range(num_single_layers):
        o, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        fused = (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp")
        rules += [
            *linear_rules(f"{o}.modulation.lin", f"{d}.norm.linear"),
            *linear_rules(f"{o}.linear1", fused),
            *linear_rules(f"{o}.linear2", f"{d}.proj_out"),
            KeyRule(f"{o}.norm.query_norm.scale", (f"{d}.attn.norm_q.weight",)),
            KeyRule(f"{o}.norm.key_norm.scale", (f"{d}.attn.norm_k.weight",)),
        ]
    return rules


class FluxFamily(FlowTransformerFamily):
    """Flux.1 dev / schnell (``model.options.preset``: ``dev``, ``schnell``, ``tiny``, ``tiny_schnell``)."""

    arch = "flux"
    pipeline_class = "FluxPipeline"
    transformer_class = FluxTransformer2DModel
    slots = SLOTS
    options_class = FluxOptions
    default_preset = "dev"
    full_range_sigmas = True
    single_file_marker = "double_blocks.0.img_attn.norm.key_norm.scale"
    single_file_excludes = (
        "single_stream_modulation",
        "distilled_guidance_layer",
        "early_stream_modulations",
    )

    @classmethod
    def original_rules(cls, config: dict[str, Any]) -> list[KeyRule]:
        return flux_rules(int(config["num_layers"]), int(config["num_single_layers"]))

    @classmethod
    def transformer_to_original(
        cls, state: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> dict[str, Any]:
        return rules_to_original(state, cls.original_rules(config))

    @classmethod
    def transformer_from_original(
        cls, state: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """Block counts come from the file; the fused widths from its own ``img_in`` (hidden size) and MLP
        ratio 4, so a checkpoint of another width fails the preset match instead of mis-splitting."""
        inner = int(state["img_in.weight"].shape[0]) if "img_in.weight" in state else 0
        rules = flux_rules(_block_count(state, "double_blocks."), _block_count(state, "single_blocks."))
        return rules_from_original(state, rules, {3: [inner] * 3, 4: [inner] * 3 + [inner * 4]})

    @classmethod
    def preset_fits(cls, state: dict[str, torch.Tensor], config: dict[str, Any]) -> bool:
        img_in = state.get("img_in.weight")
        width = config["num_attention_heads"] * config["attention_head_dim"]
        return (
            img_in is not None
            and tuple(img_in.shape) == (width, config["in_channels"])
            and _block_count(state, "double_blocks.") == config["num_layers"]
            and _block_count(state, "single_blocks.") == config["num_single_layers"]
            and ("guidance_in.in_layer.weight" in state) == bool(config.get("guidance_embeds"))
        )

    @classmethod
    def fallback_defaults(cls, transformer: ModelMixin) -> dict[str, Any]:
        return {"resolution": 1024, "t5_max_length": 512 if transformer.config.guidance_embeds else 256}

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    def swappable_blocks(self) -> list[nn.Module]:
        """The double-stream blocks, then the single-stream ones (the forward's order)."""
        t = self.transformer
        return [*t.transformer_blocks, *t.single_transformer_blocks]

    def embedded_guidance(self, scale: float, n: int) -> Conditioning | None:
        """dev: the scale goes into the guidance embedding (no CFG); schnell: None (ordinary CFG)."""
        return {"guidance": torch.full((n,), float(scale))} if self.guidance_embeds else None

    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        ((_, pooled),) = self._clip_outputs(prompts)
        return {"prompt_embeds": self._t5_output(prompts).float(), "pooled_projections": pooled.float()}

    def _transformer_inputs(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        dtype: torch.dtype,
        guided: bool,
    ) -> dict[str, Any]:
        """Packed latents, ids, text and (``guided``: for a guidance-embedding model) the guidance scale:
        what the transformer and a Flux ControlNet both take."""
        b, _, h, w = noisy.shape
        device = noisy.device
        text = cond["prompt_embeds"]
        guidance = None
        if guided:
            guidance = cond.get("guidance")
            if guidance is None:
                guidance = torch.full((b,), float(self.options.train_guidance))
            guidance = guidance.to(device=device, dtype=torch.float32)
        return {
            "hidden_states": pack_latents(noisy).to(dtype),
            "timestep": (timesteps.float() / 1000).to(dtype),
            "guidance": guidance,
            "pooled_projections": cond["pooled_projections"].to(dtype),
            "encoder_hidden_states": text.to(dtype),
            "txt_ids": torch.zeros(text.shape[1], 3, device=device),
            "img_ids": latent_image_ids(h // 2, w // 2, device),
        }

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        _, _, h, w = noisy.shape
        dtype = module_dtype(self.transformer)
        out = self.transformer(
            **self._transformer_inputs(noisy, timesteps, cond, dtype, self.guidance_embeds),
            controlnet_block_samples=unpack_blocks(cond, CONTROL_DOUBLE_KEY, dtype),
            controlnet_single_block_samples=unpack_blocks(cond, CONTROL_SINGLE_KEY, dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w).to(noisy.dtype)

    # ControlNetSupport ----------------------------------------------------------------------------------
    def load_controlnet(self, path: Path) -> nn.Module:
        """A ``FluxControlNetModel`` folder (InstantX style: latent input; XLabs style: pixel input through
        its own hint encoder). Union ControlNets need a mode per image: refused."""
        net = load_transformer_controlnet(path, FluxControlNetModel, self.transformer.dtype)
        if net.union:
            raise ValueError(
                f"ControlNet '{path}' is a union ControlNet (needs a control mode); not supported"
            )
        if net.config.in_channels != self.transformer.config.in_channels:
            raise ValueError(
                f"ControlNet '{path}' takes {net.config.in_channels} packed latent channels, not this "
                f"model's {self.transformer.config.in_channels}"
            )
        return net

    def prepare_control_image(self, controlnet: nn.Module, image: torch.Tensor) -> torch.Tensor:
        """XLabs ControlNets (with an ``input_hint_block``) take pixels in [-1, 1]; InstantX ones the
        packed latents of the image (the posterior mean, so sampling stays deterministic)."""
        if controlnet.input_hint_block is not None:
            return image
        return pack_latents(self.encode_images(image))

    def control_residuals(
        self,
        controlnet: nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        image: torch.Tensor,
        scale: float,
    ) -> Conditioning:
        dtype = controlnet.dtype
        double, single = controlnet(
            **self._transformer_inputs(noisy, timesteps, cond, dtype, controlnet.config.guidance_embeds),
            controlnet_cond=image.to(dtype),
            conditioning_scale=scale,
            return_dict=False,
        )
        # one residual per transformer block, spread as the transformer would spread the shorter lists
        # (XLabs ControlNets repeat theirs over the double blocks), so several ControlNets add up
        n, m = len(self.transformer.transformer_blocks), len(self.transformer.single_transformer_blocks)
        repeat = controlnet.input_hint_block is not None
        out = {}
        if double:
            step = math.ceil(n / len(double))
            out.update(
                pack_blocks(
                    CONTROL_DOUBLE_KEY, [double[i % len(double) if repeat else i // step] for i in range(n)]
                )
            )
        if single:
            step = math.ceil(m / len(single))
            out.update(pack_blocks(CONTROL_SINGLE_KEY, [single[i // step] for i in range(m)]))
        return out

    def to_original_state_dict(self) -> dict[str, torch.Tensor]:
        """BFL's transformer-only layout (``flux1-dev.safetensors``); the VAE and text encoders of a Flux
        release are separate files (see ``model.vae_path``, ``clip_l_path``, ``t5_path``)."""
        return self.transformer_to_original(self.transformer.state_dict(), dict(self.transformer.config))
