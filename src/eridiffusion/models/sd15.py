"""Stable Diffusion 1.5: UNet conditioned on CLIP-L's last hidden state (eps or v prediction).

Everything shared with SDXL (presets, VAE latents, DDPM objective, loading and saving) is in
:mod:`eridiffusion.models.stable_diffusion`; this module only says how the prompt conditions the UNet.
"""

from __future__ import annotations

from transformers import CLIPTextModel

from eridiffusion.models.prompt_chunks import join_chunks
from eridiffusion.models.protocol import Conditioning
from eridiffusion.models.stable_diffusion import StableDiffusionFamily, TextSlot


class SD15Family(StableDiffusionFamily):
    """``Conditioning``: ``context`` (B, 77, 768) -- the final (layer-normed) CLIP-L hidden states; the
    UNet call itself (``predict``) is the shared one of :class:`StableDiffusionFamily`."""

    arch = "sd15"
    pipeline_class = "StableDiffusionPipeline"
    text_slots = (
        TextSlot(
            module="text_encoder",
            tokenizer="tokenizer",
            model_class=CLIPTextModel,
            override="clip_l_path",
            ldm_prefix="cond_stage_model.transformer.",
            open_clip=False,
        ),
    )
    ldm_marker = "cond_stage_model.transformer."

    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        slot = self.text_slots[0]
        ids = self._token_ids(slot, prompts)
        return {"context": join_chunks(self.text_encoders[slot.module](ids).last_hidden_state, len(prompts))}

    def extra_index_entries(self) -> dict[str, object]:
        # diffusers' StableDiffusionPipeline expects these optional components to be declared
        return {
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        }
