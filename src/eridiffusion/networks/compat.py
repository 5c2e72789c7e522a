"""Which other tools load an adapter file we write, told at save time from the file's own key names.

Checked against the loaders themselves (tests/families/test_lora_interop.py; the README's format table):
diffusers' ``load_lora_weights`` reads kohya SD1.5/SDXL/Flux files and only its own layout for SD3;
ComfyUI's key map reads kohya names for every family, and diffusers-layout names for SD3/Flux
(``transformer.*``) but not the UNet attention layers of SD1.5/SDXL (it expects diffusers' older
attention-processor names there).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# diffusers' kohya-Flux converter gives these top-level layers no ``transformer.`` prefix, so it drops them
_FLUX_TOP_LEVEL = re.compile(r"lora_unet_(img_in|txt_in|time_in|vector_in|guidance_in|final_layer)_")
_UNET_ATTENTION = re.compile(r"^unet\..*\.attn[12]\.")


def compatibility_warnings(fmt: str, keys: Iterable[str]) -> list[str]:
    """What will not load where, for a file of format ``fmt`` holding tensors ``keys``; empty when the
    file loads in ComfyUI, A1111/Forge and diffusers alike."""
    keys = list(keys)
    notes = []
    if fmt == "diffusers" and any(_UNET_ATTENTION.match(k) for k in keys):
        notes.append(
            "ComfyUI will not load the UNet attention layers of this diffusers-format file (it reads "
            "kohya names); use save.format: kohya for ComfyUI/A1111/Forge (diffusers reads that too)"
        )
    if fmt == "kohya" and any(k.startswith("lora_unet_joint_blocks_") for k in keys):
        notes.append(
            "diffusers reads SD3 LoRAs only in its own layout: this kohya file loads in ComfyUI/Forge; "
            "write save.format: diffusers (or `eri convert --to diffusers`) for diffusers"
        )
    dropped = sorted({k.split(".")[0] for k in keys if fmt == "kohya" and _FLUX_TOP_LEVEL.match(k)})
    if dropped:
        notes.append(
            f"diffusers' load_lora_weights silently skips the top-level Flux layers of kohya files "
            f"({', '.join(dropped[:3])}{'...' if len(dropped) > 3 else ''}); ComfyUI/Forge load them. "
            "For diffusers write save.format: diffusers, or train block layers only (target attention_mlp)"
        )
    return notes
