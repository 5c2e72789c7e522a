"""Adapters (LoRA, LoHa, LoKr, DoRA) for training, and adapter files for inference and exchange."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from eridiffusion.config.schema import NetworkConfig
from eridiffusion.models.protocol import ModelFamily
from eridiffusion.networks.adapters import (
    adapter_alphas,
    adapter_parameters,
    adapter_state,
    inject,
    load_adapter_state,
    merge_adapters,
)
from eridiffusion.networks.formats import (
    AdapterFile,
    apply_adapter,
    peft_state_from_file,
    read_adapter_file,
    save_adapter,
)

__all__ = [
    "AdapterFile",
    "AdapterSpec",
    "adapter_state",
    "apply_adapter",
    "apply_adapter_files",
    "attach_network",
    "export_network",
    "load_adapter_state",
    "merge_adapters",
    "parse_adapter_arg",
    "read_adapter_file",
]


def attach_network(
    family: ModelFamily, cfg: NetworkConfig, train_text_encoder: bool, seed: int = 0
) -> dict[str, nn.Parameter]:
    """Freeze the model, inject adapters, optionally load ``cfg.init_from``; returns the trainable tensors.

    peft draws the initial adapter weights from the global RNG: ``seed`` pins them, so the same config gives
    the same adapter whatever ran before (a resumed pipeline reaches this point with another RNG state)."""
    for module in family.modules().values():
        module.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject(family, cfg, train_text_encoder)
    if cfg.init_from:
        adapter = read_adapter_file(Path(cfg.init_from), family)
        state = peft_state_from_file(adapter, family, adapter_alphas(family))
        try:
            load_adapter_state(family, state)
        except (ValueError, RuntimeError) as exc:
            raise ValueError(
                f"network.init_from: '{cfg.init_from}' does not fit this network config "
                f"(type/rank/targets must match the file): {exc}"
            ) from None
    params = adapter_parameters(family)
    for p in params.values():
        p.requires_grad_(True)
    return params


def export_network(
    family: ModelFamily, cfg: NetworkConfig, path: Path, fmt: str, dtype: str, info: dict[str, str]
) -> Path:
    """Write the current adapter weights as a standalone file with a descriptive safetensors header."""
    network_json = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    metadata = {
        **info,
        "eri_network": network_json,
        "eri_network_hash": hashlib.sha256(network_json.encode()).hexdigest()[:16],
        "eri_arch": family.arch,
        # the fields A1111/Forge and kohya's tools show for a LoRA
        "ss_network_module": f"eridiffusion.{cfg.type}",
        "ss_network_dim": str(cfg.linear),
        "ss_network_alpha": str(cfg.linear_alpha),
    }
    return save_adapter(family, adapter_state(family), adapter_alphas(family), path, fmt, dtype, metadata)


def parse_adapter_arg(text: str) -> tuple[Path, float]:
    """``path.safetensors`` or ``path.safetensors:0.8`` (A1111's ``<lora:name:weight>`` weight)."""
    path, sep, weight = text.rpartition(":")
    if sep and path and weight.replace(".", "", 1).lstrip("-").isdigit():
        return Path(path), float(weight)
    return Path(text), 1.0


class AdapterSpec(NamedTuple):
    """An adapter file and its multipliers: ``weight`` for the denoiser and, unless ``te_weight`` says
    otherwise, the text encoders (A1111's ``<lora:name:te:unet>`` sets them apart)."""

    path: Path
    weight: float = 1.0
    te_weight: float | None = None


def apply_adapter_files(family: ModelFamily, specs: Sequence[tuple[Path, float] | AdapterSpec]) -> None:
    """Merge each adapter file into the weights with its multipliers (order does not matter)."""
    for spec in specs:
        s = AdapterSpec(*spec)
        apply_adapter(family, read_adapter_file(s.path, family), s.weight, s.te_weight)
