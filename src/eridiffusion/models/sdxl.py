"""Stable Diffusion XL: two CLIP text encoders, pooled text embeddings and size/crop conditioning.

The UNet's cross-attention context is the penultimate hidden states of CLIP-L (768) and CLIP-G (1280)
concatenated; its ``added_cond_kwargs`` take CLIP-G's projected pooled embedding (``text_embeds``) and six
``time_ids`` -- original size, crop top-left and target size -- that SDXL was trained with (Podell et al.
2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis", section 2.2).
Shared machinery is in :mod:`eridiffusion.models.stable_diffusion`.
"""

from __future__ import annotations

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from eridiffusion.models.ldm_layout import unet_key_to_ldm
from eridiffusion.models.prompt_chunks import first_chunk, join_chunks
from eridiffusion.models.protocol import Conditioning, module_dtype
from eridiffusion.models.stable_diffusion import StableDiffusionFamily, TextSlot


def time_ids(
    original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]
) -> torch.Tensor:
    """SDXL's micro-conditioning vector for one image: (orig_h, orig_w, crop_top, crop_left, h, w)."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


def batch_time_ids(size_conditioning: torch.Tensor, target_size: tuple[int, int]) -> torch.Tensor:
    """(B, 6) time ids from per-image (orig_h, orig_w, crop_top, crop_left) rows and the batch's (h, w)."""
    target = torch.tensor(target_size, dtype=torch.float32, device=size_conditioning.device)
    rows = size_conditioning.float()
    return torch.cat([rows, target.expand(rows.shape[0], 2)], dim=1)


class SDXLFamily(StableDiffusionFamily):
    """``Conditioning``: ``context`` (B, 77, 2048), ``pooled`` (B, 1280) and optionally ``time_ids`` (B, 6)
    or ``size_conditioning`` (B, 4).

    ``size_conditioning`` -- (original h, original w, crop top, crop left) per image -- is what the
    training loop adds from the data (:meth:`eridiffusion.data.loader.Batch.size_conditioning`); the target
    size is the batch's own image size. Without either (sampling, or data without size metadata)
    :meth:`predict` uses what diffusers' SDXL pipeline uses by default: original size = target size = the
    generated size, crop (0, 0).
    Empty prompts encode to zeros (``force_zeros_for_empty_prompt``, the SDXL base pipeline's setting), in
    training (caption dropout) and sampling (empty negative prompt) alike.
    """

    arch = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    text_slots = (
        TextSlot(
            module="text_encoder",
            tokenizer="tokenizer",
            model_class=CLIPTextModel,
            override="clip_l_path",
            ldm_prefix="conditioner.embedders.0.transformer.",
            open_clip=False,
        ),
        TextSlot(
            module="text_encoder_2",
            tokenizer="tokenizer_2",
            model_class=CLIPTextModelWithProjection,
            override="clip_g_path",
            ldm_prefix="conditioner.embedders.1.model.",
            open_clip=True,
        ),
    )
    ldm_marker = "conditioner.embedders.1."

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        return bool(self.pipeline_config.get("force_zeros_for_empty_prompt", True))

    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        hidden = []
        pooled = torch.empty(0)
        for slot in self.text_slots:
            out = self.text_encoders[slot.module](self._token_ids(slot, prompts), output_hidden_states=True)
            hidden.append(join_chunks(out.hidden_states[-2], len(prompts)))
            if slot.open_clip:
                pooled = first_chunk(out.text_embeds, len(prompts))
        dtype = module_dtype(self.unet)
        context = torch.cat([h.to(dtype) for h in hidden], dim=-1)
        pooled = pooled.to(dtype)
        if self.force_zeros_for_empty_prompt:
            keep = torch.tensor([bool(p) for p in prompts], device=context.device)
            context = context * keep[:, None, None].to(dtype)
            pooled = pooled * keep[:, None].to(dtype)
        return {"context": context, "pooled": pooled}

    def added_cond(self, noisy: torch.Tensor, cond: Conditioning) -> dict[str, torch.Tensor]:
        ids = cond.get("time_ids")
        if ids is None:
            f = self.vae_scale_factor
            size = (noisy.shape[-2] * f, noisy.shape[-1] * f)
            given = cond.get("size_conditioning")
            if given is None:
                ids = time_ids(size, (0, 0), size).expand(noisy.shape[0], 6).to(noisy.device)
            else:
                ids = batch_time_ids(given, size).to(noisy.device)
        return {"text_embeds": cond["pooled"], "time_ids": ids}

    def kohya_text_prefix(self, component: str) -> str:
        return {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}[component]

    def denoiser_lora_names(self, module_path: str) -> tuple[str, str]:
        """kohya trains SDXL on the original (sgm) UNet, so its names are the original block names
        (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``)."""
        original = unet_key_to_ldm(f"{module_path}.weight", dict(self.unet.config)).removesuffix(".weight")
        return f"lora_unet_{original.replace('.', '_')}", f"unet.{module_path}"

    def extra_index_entries(self) -> dict[str, object]:
        return {
            "image_encoder": [None, None],
            "feature_extractor": [None, None],
            "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt,
        }
