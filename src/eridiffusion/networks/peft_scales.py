"""LoRA scales that peft/diffusers files keep outside their tensors.

A diffusers-layout or peft file has ``lora_A``/``lora_B`` but no ``.alpha`` tensors: the scale alpha/r lives
in the peft ``LoraConfig`` -- in the safetensors header as diffusers' ``lora_adapter_metadata`` (the config
fields per component, ``{"unet.r": 4, "unet.lora_alpha": 8, ...}``, written by
``save_lora_weights(..., unet_lora_adapter_metadata=...)``), or in ``adapter_config.json`` beside peft's
``adapter_model.safetensors``. Without either the scale is 1, as diffusers loads such files.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
_PEFT_DEFAULT_ALPHA = 8.0  # LoraConfig's lora_alpha when a config leaves it out


@dataclass(frozen=True)
class LoraScale:
    """The parts of a peft ``LoraConfig`` that set a layer's scale."""

    lora_alpha: float
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str) -> LoraScale:
        try:
            return cls(
                lora_alpha=float(config.get("lora_alpha", _PEFT_DEFAULT_ALPHA)),
                alpha_pattern=dict(config.get("alpha_pattern") or {}),
                use_rslora=bool(config.get("use_rslora", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: not a LoRA config with a numeric lora_alpha ({exc})") from None

    def alpha(self, module_path: str, rank: int) -> float:
        """The kohya-style alpha (scale x rank) of the layer at ``module_path`` with this ``rank``; peft
        matches its patterns against the end of the module path."""
        alpha = self.lora_alpha
        for pattern, value in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", module_path):
                alpha = float(value)
                break
        scale = alpha / math.sqrt(rank) if self.use_rslora else alpha / rank
        return scale * rank


def header_scales(metadata: dict[str, str], where: str) -> dict[str, LoraScale]:
    """Component prefix (``unet``, ``text_encoder``, ``transformer``...) -> its config, from diffusers'
    ``lora_adapter_metadata`` header; empty when the file has none."""
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: header {DIFFUSERS_METADATA_KEY} is not JSON ({exc})") from None
    configs: dict[str, dict[str, Any]] = {}
    for key, value in packed.items():
        prefix, _, name = key.rpartition(".")
        configs.setdefault(prefix, {})[name] = value
    return {prefix: LoraScale.from_config(cfg, f"{where} ({prefix})") for prefix, cfg in configs.items()}


def folder_scales(weights: Path) -> dict[str, LoraScale]:
    """peft's ``adapter_config.json`` beside ``adapter_model.safetensors``, for every key (prefix "")."""
    config = weights.with_name(PEFT_CONFIG)
    if weights.name != PEFT_WEIGHTS or not config.is_file():
        return {}
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"'{config}' is not readable JSON ({exc})") from None
    return {"": LoraScale.from_config(data, f"'{config}'")}


def adapter_weights_file(path: Path) -> Path:
    """The weights of an adapter given as a file, or as a peft / diffusers folder."""
    if not path.is_dir():
        return path
    for name in (PEFT_WEIGHTS, DIFFUSERS_WEIGHTS):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(
        f"adapter folder '{path}' holds neither {PEFT_WEIGHTS} (peft) nor {DIFFUSERS_WEIGHTS} (diffusers)"
    )


def scale_alpha(scales: dict[str, LoraScale], layer_name: str, rank: int) -> float | None:
    """The alpha of a file's layer ``layer_name`` (its tensor names without ``.lora_A.weight``) from the
    config of the longest matching component prefix; None when no config covers it (scale 1)."""
    for prefix in sorted(scales, key=len, reverse=True):
        if not prefix:
            return scales[prefix].alpha(layer_name, rank)
        if layer_name.startswith(prefix + "."):
            return scales[prefix].alpha(layer_name[len(prefix) + 1 :], rank)
    return None
