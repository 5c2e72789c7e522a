"""Inject LoRA / LoHa / LoKr / DoRA adapters into a family's modules with peft.

Which layers get an adapter is decided here, once, from diffusers/transformers naming conventions shared by
every family (``attn.to_q``, ``ff.net.2``, ``self_attn.q_proj``...), filtered by the user's
``only_if_contains`` / ``ignore_if_contains``. Adapter tensors are addressed as
``<component>.<module path>.<peft parameter>`` (``denoiser.mid_block...to_q.lora_A.weight``), the
naming the format converters in :mod:`eridiffusion.networks.formats` translate from and to.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from peft import (
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from eridiffusion.config.schema import NetworkConfig
from eridiffusion.models.protocol import ModelFamily
from eridiffusion.networks.formats import is_adaptable

ADAPTER = "default"

_ATTENTION = re.compile(
    r"(^|\.)(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|q_proj|k_proj|v_proj|out_proj)$"
)
_MLP = re.compile(r"(^|\.)(ff|ff_context)\.net\.(0\.proj|2)$|(^|\.)(proj_mlp|fc1|fc2)$|(^|\.)mlp\.(fc1|fc2)$")
# inside a block only: a top-level proj_out is Flux/SD3's output head (BFL's final_layer), which sd-scripts
# does not train and diffusers' kohya-Flux loader drops
_TRANSFORMER_IO = re.compile(r"\.(proj_in|proj_out)$")

TARGET_PRESETS = ("attention", "attention_mlp", "all_linear")


@dataclass(frozen=True)
class TargetSelection:
    linear: list[str]
    conv: list[str]


def _is_target_linear(name: str, preset: str) -> bool:
    if preset == "all_linear":
        return True
    if _ATTENTION.search(name):
        return True
    return preset == "attention_mlp" and bool(_MLP.search(name) or _TRANSFORMER_IO.search(name))


def select_targets(module: nn.Module, cfg: NetworkConfig) -> TargetSelection:
    """Names of the Linear (and, with ``conv`` set, k>1 Conv2d) layers of ``module`` to adapt."""
    linear, conv = [], []
    for name, layer in module.named_modules():
        if not name:
            continue
        if cfg.only_if_contains and not any(s in name for s in cfg.only_if_contains):
            continue
        if any(s in name for s in cfg.ignore_if_contains):
            continue
        if isinstance(layer, nn.Linear) and _is_target_linear(name, cfg.target):
            linear.append(name)
        elif isinstance(layer, nn.Conv2d) and cfg.conv and layer.kernel_size != (1, 1):
            conv.append(name)
        elif (
            isinstance(layer, nn.Conv2d)
            and layer.kernel_size == (1, 1)
            and _is_target_linear(name, cfg.target)
        ):
            linear.append(name)  # 1x1 projections (SD1.5 proj_in/out) behave like Linear layers
    return TargetSelection(linear, conv)


def _exact(names: list[str]) -> dict[str, int | float]:
    return {re.escape(n): 0 for n in names}


def peft_config(cfg: NetworkConfig, targets: TargetSelection) -> PeftConfig:
    """One peft config: linear layers at (linear, linear_alpha), convs at (conv, conv_alpha) via patterns."""
    names = targets.linear + targets.conv
    rank_pattern = {k: cfg.conv for k in _exact(targets.conv)} if cfg.conv else {}
    alpha_pattern = {k: cfg.conv_alpha or cfg.conv for k in _exact(targets.conv)} if cfg.conv else {}
    # one regex of the exact paths: a list would also match by suffix (Flux's top-level ``proj_out`` would
    # pull in every ``single_transformer_blocks.N.proj_out`` that only_if/ignore_if_contains left out)
    exact = "|".join(_exact(names))
    common = {"target_modules": f"(?:{exact})", "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    if cfg.type in ("lora", "dora"):
        return LoraConfig(
            r=cfg.linear,
            lora_alpha=cfg.linear_alpha,
            lora_dropout=cfg.dropout,
            use_dora=cfg.type == "dora",
            **common,
        )
    if cfg.type == "loha":
        return LoHaConfig(r=cfg.linear, alpha=cfg.linear_alpha, module_dropout=cfg.dropout, **common)
    if cfg.type == "lokr":
        return LoKrConfig(
            r=cfg.linear,
            alpha=cfg.linear_alpha,
            module_dropout=cfg.dropout,
            decompose_factor=cfg.lokr_factor,
            **common,
        )
    raise ValueError(f"unknown network.type {cfg.type!r}")


def inject(family: ModelFamily, cfg: NetworkConfig, train_text_encoder: bool) -> dict[str, TargetSelection]:
    """Add adapters (initialised so the model's output is unchanged) to the denoiser and/or the text
    encoders (``cfg.adapts``); everything else stays frozen. Returns what was adapted per component."""
    denoiser, text = cfg.adapts(train_text_encoder)
    chosen: dict[str, TargetSelection] = {}
    for component, module in family.modules().items():
        wanted = denoiser if component == "denoiser" else text
        if not is_adaptable(component) or not wanted:
            continue
        targets = select_targets(module, cfg)
        if not targets.linear and not targets.conv:
            if component == "denoiser":
                raise ValueError(
                    f"network: no layer of the {family.arch} denoiser matches target={cfg.target!r} with "
                    f"only_if_contains={cfg.only_if_contains} ignore_if_contains={cfg.ignore_if_contains}"
                )
            continue
        inject_adapter_in_model(peft_config(cfg, targets), module, adapter_name=ADAPTER)
        chosen[component] = targets
    if not chosen:
        raise ValueError(
            f"network.components {cfg.components}: no layer of the {family.arch} text encoders matches "
            f"target={cfg.target!r} with only_if_contains={cfg.only_if_contains}"
        )
    return chosen


def adapter_parameters(family: ModelFamily) -> dict[str, nn.Parameter]:
    """The adapter's trainable tensors, by ``component.path`` (peft's ``.default`` suffixes included)."""
    params: dict[str, nn.Parameter] = {}
    for component, module in family.modules().items():
        for name, p in module.named_parameters():
            if f".{ADAPTER}" in name and _is_adapter_param(name):
                params[f"{component}.{name}"] = p
    return params


def _is_adapter_param(name: str) -> bool:
    return any(tag in name for tag in ("lora_", "hada_", "lokr_"))


def adapter_state(family: ModelFamily) -> dict[str, torch.Tensor]:
    """Adapter weights without peft's adapter-name suffix: ``component.path.lora_A.weight``."""
    state: dict[str, torch.Tensor] = {}
    for component, module in family.modules().items():
        if not any(isinstance(m, BaseTunerLayer) for m in module.modules()):
            continue
        for key, value in get_peft_model_state_dict(module, adapter_name=ADAPTER).items():
            state[f"{component}.{key}"] = value.detach()
    return state


def load_adapter_state(family: ModelFamily, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (as produced by :func:`adapter_state`) into already-injected adapters; strict."""
    modules = family.modules()
    by_component: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        component, _, rest = key.partition(".")
        if component not in modules:
            raise ValueError(f"adapter tensor {key!r} names unknown component {component!r}")
        by_component.setdefault(component, {})[rest] = value
    for component, sub in by_component.items():
        result = set_peft_model_state_dict(modules[component], sub, adapter_name=ADAPTER)
        unexpected = getattr(result, "unexpected_keys", []) or []
        if unexpected:
            raise ValueError(f"adapter tensors do not fit the {component}: e.g. {unexpected[:3]}")


@contextlib.contextmanager
def adapters_disabled(family: ModelFamily) -> Iterator[None]:
    """The frozen base for the block: every injected adapter is bypassed (peft's ``enable_adapters``),
    then switched back on with each adapter tensor's ``requires_grad`` as it was (peft's switch resets it).

    This is how a training step asks "what would the model do without the adapter" without a second copy
    of the model (output preservation)."""
    modules = family.modules().values()
    layers = [m for module in modules for m in module.modules() if isinstance(m, BaseTunerLayer)]
    grads = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in grads:
            p.requires_grad_(flag)


@torch.no_grad()
def merge_adapters(family: ModelFamily) -> None:
    """Bake injected adapters into the base weights and remove the adapter layers."""
    for module in family.modules().values():
        for name, layer in list(module.named_modules()):
            if isinstance(layer, BaseTunerLayer):
                layer.merge()
                parent_name, _, child = name.rpartition(".")
                parent = module.get_submodule(parent_name) if parent_name else module
                setattr(parent, child, layer.get_base_layer())


def adapter_alphas(family: ModelFamily) -> dict[tuple[str, str], tuple[float, int]]:
    """(alpha, rank) of every injected layer, keyed like the format converters: (component, path)."""
    found: dict[tuple[str, str], tuple[float, int]] = {}
    for component, module in family.modules().items():
        for path, layer in module.named_modules():
            if isinstance(layer, BaseTunerLayer) and ADAPTER in getattr(layer, "r", {}):
                alpha = layer.lora_alpha[ADAPTER] if hasattr(layer, "lora_alpha") else layer.alpha[ADAPTER]
                found[(component, path)] = (float(alpha), int(layer.r[ADAPTER]))
    return found


def lora_parameter_count(module: nn.Module, cfg: NetworkConfig) -> int:
    """Parameters a LoRA/DoRA of ``cfg`` would add to ``module`` (LoHa doubles the factors; LoKr varies)."""
    total = 0
    targets = select_targets(module, cfg)
    for names, rank in ((targets.linear, cfg.linear), (targets.conv, cfg.conv or 0)):
        for name in names:
            layer = module.get_submodule(name)
            weight = layer.weight
            fan_in = weight[0].numel()
            total += rank * (fan_in + weight.shape[0]) * (2 if cfg.type == "loha" else 1)
            total += weight.shape[0] if cfg.type == "dora" else 0
    return total
