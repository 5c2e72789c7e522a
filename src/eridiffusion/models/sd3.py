"""Stable Diffusion 3.5 (Medium, Large): an MMDiT over 16-channel latents, CLIP-L + CLIP-G + T5-XXL.

Conditioning follows diffusers' ``StableDiffusion3Pipeline`` (Esser et al. 2024, section 5.2): the two
CLIPs' penultimate hidden states are concatenated (768 + 1280 features), zero-padded to T5's 4096 and
stacked in front of the T5 sequence (77 + 256 tokens); their pooled (projected) outputs are concatenated
into the 2048-d ``pooled_projections``. The transformer takes timesteps sigma x 1000, i.e. the flow
objective's timesteps as they are. Single files use Stability's layout
(``model.diffusion_model.joint_blocks``, ``first_stage_model``, ``text_encoders.clip_l|clip_g|t5xxl``),
converted with diffusers' own ``convert_sd3_transformer_checkpoint_to_diffusers``; :func:`sd3_rules` is the
inverse for export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import SD3ControlNetModel, SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from transformers import CLIPTextModelWithProjection, T5EncoderModel

from eridiffusion.models.controlnet import load_transformer_controlnet, pack_blocks, unpack_blocks
from eridiffusion.models.flow_common import (
    TRANSFORMER_PREFIX,
    FlowTransformerFamily,
    pad_to_width,
)
from eridiffusion.models.flow_text import EncoderSlot
from eridiffusion.models.key_rules import KeyRule, linear_rules, rules_to_original
from eridiffusion.models.ldm_layout import vae_to_ldm
from eridiffusion.models.protocol import Conditioning, module_dtype

CONTROL_BLOCK_KEY = "controlnet_block_"
"""``controlnet_block_{i}``: a ControlNet's residual for the i-th joint transformer block."""

SLOTS = (
    EncoderSlot(
        "text_encoder",
        "tokenizer",
        "clip",
        CLIPTextModelWithProjection,
        "clip_l_path",
        "text_encoders.clip_l.transformer.",
        "lora_te1",
        trainable=True,
    ),
    EncoderSlot(
        "text_encoder_2",
        "tokenizer_2",
        "clip",
        CLIPTextModelWithProjection,
        "clip_g_path",
        "text_encoders.clip_g.transformer.",
        "lora_te2",
        trainable=True,
    ),
    EncoderSlot(
        "text_encoder_3",
        "tokenizer_3",
        "t5",
        T5EncoderModel,
        "t5_path",
        "text_encoders.t5xxl.transformer.",
        "lora_te3",
        trainable=False,
    ),
)


def sd3_rules(config: dict[str, Any]) -> list[KeyRule]:
    """Stability's MMDiT names <-> diffusers' ``SD3Transformer2DModel`` names, one rule per tensor.

    The last joint block is ``context_pre_only``: its context stream has no output projection or MLP and a
    (shift, scale) adaLN that diffusers stores as (scale, shift).
    """
    n = int(config["num_layers"])
    dual = set(config.get("dual_attention_layers") or ())
    rules = [
        KeyRule("pos_embed", ("pos_embed.pos_embed",)),
        *linear_rules("x_embedder.proj", "pos_embed.proj"),
        *linear_rules("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
        *linear_rules("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
        *linear_rules("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
        *linear_rules("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
        *linear_rules("context_embedder", "context_embedder"),
        *linear_rules("final_layer.linear", "proj_out"),
        *linear_rules("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True),
    ]
    for i in range(n):
        o, d = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        last = i == n - 1
        qkv = tuple(f"{d}.attn.to_{p}" for p in "qkv")
        add_qkv = tuple(f"{d}.attn.add_{p}_proj" for p in "qkv")
        rules += [
            *linear_rules(f"{o}.x_block.attn.qkv", qkv),
            *linear_rules(f"{o}.context_block.attn.qkv", add_qkv),
            *linear_rules(f"{o}.x_block.attn.proj", f"{d}.attn.to_out.0"),
            *linear_rules(f"{o}.x_block.adaLN_modulation.1", f"{d}.norm1.linear"),
            *linear_rules(f"{o}.context_block.adaLN_modulation.1", f"{d}.norm1_context.linear", swap=last),
            *linear_rules(f"{o}.x_block.mlp.fc1", f"{d}.ff.net.0.proj"),
            *linear_rules(f"{o}.x_block.mlp.fc2", f"{d}.ff.net.2"),
            KeyRule(f"{o}.x_block.attn.ln_q.weight", (f"{d}.attn.norm_q.weight",)),
            KeyRule(f"{o}.x_block.attn.ln_k.weight", (f"{d}.attn.norm_k.weight",)),
            KeyRule(f"{o}.context_block.attn.ln_q.weight", (f"{d}.attn.norm_added_q.weight",)),
            KeyRule(f"{o}.context_block.attn.ln_k.weight", (f"{d}.attn.norm_added_k.weight",)),
        ]
        if not last:
            rules += [
                *linear_rules(f"{o}.context_block.attn.proj", f"{d}.attn.to_add_out"),
                *linear_rules(f"{o}.context_block.mlp.fc1", f"{d}.ff_context.net.0.proj"),
                *linear_rules(f"{o}.context_block.mlp.fc2", f"{d}.ff_context.net.2"),
            ]
        if i in dual:
            rules += [
                *linear_rules(f"{o}.x_block.attn2.qkv", tuple(f"{d}.attn2.to_{p}" for p in "qkv")),
                *linear_rules(f"{o}.x_block.attn2.proj", f"{d}.attn2.to_out.0"),
                KeyRule(f"{o}.x_block.attn2.ln_q.weight", (f"{d}.attn2.norm_q.weight",)),
                KeyRule(f"{o}.x_block.attn2.ln_k.weight", (f"{d}.attn2.norm_k.weight",)),
            ]
    return rules


class SD3Family(FlowTransformerFamily):
    """SD3.5 Medium / Large (``model.options.preset``: ``medium``, ``large`` or ``tiny`` for tests)."""

    arch = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    transformer_class = SD3Transformer2DModel
    slots = SLOTS
    default_preset = "medium"
    single_file_marker = "joint_blocks.0.context_block.adaLN_modulation.1.bias"

    @classmethod
    def original_rules(cls, config: dict[str, Any]) -> list[KeyRule]:
        return sd3_rules(config)

    @classmethod
    def transformer_to_original(
        cls, state: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> dict[str, Any]:
        return rules_to_original(state, cls.original_rules(config))

    @classmethod
    def transformer_from_original(
        cls, state: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        return convert_sd3_transformer_checkpoint_to_diffusers(state)

    @classmethod
    def preset_fits(cls, state: dict[str, torch.Tensor], config: dict[str, Any]) -> bool:
        context, pos = state.get("context_embedder.weight"), state.get("pos_embed")
        blocks = {k.split(".")[1] for k in state if k.startswith("joint_blocks.")}
        return (
            context is not None
            and pos is not None
            and tuple(context.shape) == (config["caption_projection_dim"], config["joint_attention_dim"])
            and pos.shape[1] == config["pos_embed_max_size"] ** 2
            and len(blocks) == config["num_layers"]
        )

    @classmethod
    def fallback_defaults(cls, transformer: ModelMixin) -> dict[str, Any]:
        return {"resolution": 1024, "t5_max_length": 256}

    @property
    def token_patch(self) -> int:
        return int(self.transformer.config.patch_size)

    def check_size(self, height: int, width: int) -> None:
        """Whole patches, and no more patches per side than the learned position table holds."""
        super().check_size(height, width)
        limit = int(self.transformer.config.pos_embed_max_size) * self.size_multiple()
        for name, value in (("height", height), ("width", width)):
            if value > limit:
                raise ValueError(f"{name} {value} exceeds this sd3 model's maximum of {limit} px")

    def swappable_blocks(self) -> list[nn.Module]:
        """The joint (MMDiT) blocks in the forward's order."""
        return list(self.transformer.transformer_blocks)

    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        clip = self._clip_outputs(prompts)
        t5 = self._t5_output(prompts)
        hidden = pad_to_width(torch.cat([h for h, _ in clip], dim=-1), t5.shape[-1])
        # float32 whatever each encoder is stored in (model.dtype); predict casts to the transformer's dtype
        return {
            "prompt_embeds": torch.cat([hidden.float(), t5.float()], dim=-2),
            "pooled_projections": torch.cat([p.float() for _, p in clip], dim=-1),
        }

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        dtype = module_dtype(self.transformer)
        out = self.transformer(
            hidden_states=noisy.to(dtype),
            timestep=timesteps.float(),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            pooled_projections=cond["pooled_projections"].to(dtype),
            block_controlnet_hidden_states=unpack_blocks(cond, CONTROL_BLOCK_KEY, dtype),
            return_dict=False,
        )[0]
        return out.to(noisy.dtype)

    # ControlNetSupport ----------------------------------------------------------------------------------
    def load_controlnet(self, path: Path) -> nn.Module:
        """An ``SD3ControlNetModel`` folder. The SD3.5 Large ControlNets without their own patch embedding
        and inpainting ones (extra input channels) need inputs this sampler does not build: refused."""
        net = load_transformer_controlnet(path, SD3ControlNetModel, self.transformer.dtype)
        if net.pos_embed is None or net.config.extra_conditioning_channels:
            raise ValueError(
                f"ControlNet '{path}' has no patch embedding or takes extra conditioning channels; only "
                "image ControlNets with their own patch embedding (SD3 Medium style) are supported"
            )
        if net.config.in_channels != self.transformer.config.in_channels:
            raise ValueError(
                f"ControlNet '{path}' takes {net.config.in_channels} latent channels, not "
                f"this model's {self.transformer.config.in_channels}"
            )
        return net

    def prepare_control_image(self, controlnet: nn.Module, image: torch.Tensor) -> torch.Tensor:
        """The control image as latents, like the noisy input (the posterior mean, so sampling stays
        deterministic); InstantX's SD3 ControlNets were trained without the VAE's shift."""
        latents = self.encode_images(image)
        if controlnet.config.force_zeros_for_pooled_projection:
            latents = latents + (self.vae.config.get("shift_factor") or 0.0) * self.vae.config.scaling_factor
        return latents

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
        pooled = cond["pooled_projections"]
        if controlnet.config.force_zeros_for_pooled_projection:
            pooled = torch.zeros_like(pooled)
        context = (
            cond["prompt_embeds"].to(dtype) if controlnet.config.joint_attention_dim is not None else None
        )
        blocks = controlnet(
            hidden_states=noisy.to(dtype),
            controlnet_cond=image.to(dtype),
            conditioning_scale=scale,
            encoder_hidden_states=context,
            pooled_projections=pooled.to(dtype),
            timestep=timesteps.float(),
            return_dict=False,
        )[0]
        # one residual per transformer block, spread as the transformer itself would spread a shorter list,
        # so that several ControlNets of different depths add up block by block
        n = len(self.transformer.transformer_blocks)
        return pack_blocks(CONTROL_BLOCK_KEY, [blocks[int(i / (n / len(blocks)))] for i in range(n)])

    def to_original_state_dict(self) -> dict[str, torch.Tensor]:
        """Stability's single-file layout: transformer, VAE and the three text encoders in one file."""
        transformer = self.transformer_to_original(
            self.transformer.state_dict(), dict(self.transformer.config)
        )
        out = {TRANSFORMER_PREFIX + k: v for k, v in transformer.items()}
        out.update(vae_to_ldm(self.vae.state_dict(), dict(self.vae.config)))
        out.update(self._encoders_to_original())
        return out
