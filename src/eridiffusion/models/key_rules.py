"""Original single-file key layouts as tables: each :class:`KeyRule` names one tensor of the original file
and the diffusers tensor(s) it holds, so saving to and loading from that layout is one loop each way (SD3.5
and Flux.1 state their tables; :mod:`.flow_common` applies them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KeyRule:
    """One original tensor and the diffusers tensor(s) it holds, concatenated along dim 0.

    ``swap``: the original stores (shift, scale) where diffusers' ``AdaLayerNormContinuous`` expects
    (scale, shift) -- true of the final adaLN layers of SD3 and Flux, which diffusers' converters swap.
    """

    original: str
    diffusers: tuple[str, ...]
    swap: bool = False


def linear_rules(original: str, diffusers_names: tuple[str, ...] | str, swap: bool = False) -> list[KeyRule]:
    """Weight and bias rules of a Linear (or fused Linears) named ``original`` / ``diffusers_names``."""
    names = (diffusers_names,) if isinstance(diffusers_names, str) else diffusers_names
    return [KeyRule(f"{original}.{p}", tuple(f"{n}.{p}" for n in names), swap) for p in ("weight", "bias")]


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def rules_to_original(state: dict[str, torch.Tensor], rules: list[KeyRule]) -> dict[str, torch.Tensor]:
    """diffusers names -> original names; every diffusers tensor must be covered by exactly one rule."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for rule in rules:
        if not all(k in state for k in rule.diffusers):
            continue
        parts = [state[k] for k in rule.diffusers]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        out[rule.original] = _swap_halves(tensor) if rule.swap else tensor
        used.update(rule.diffusers)
    left = sorted(set(state) - used)
    if left:
        raise ValueError(f"no original-layout name for {len(left)} transformer weights, e.g. {left[:3]}")
    return out


def rules_from_original(
    state: dict[str, torch.Tensor], rules: list[KeyRule], split: dict[int, list[int]]
) -> dict[str, torch.Tensor]:
    """original names -> diffusers names; ``split[n]`` gives the row sizes of a tensor fused from n parts
    (equal thirds for q/k/v, q/k/v + MLP for Flux's single blocks)."""
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        if rule.original not in state:
            continue
        tensor = state[rule.original]
        tensor = _swap_halves(tensor) if rule.swap else tensor
        if len(rule.diffusers) == 1:
            out[rule.diffusers[0]] = tensor
            continue
        sizes = split.get(len(rule.diffusers)) or [tensor.shape[0] // len(rule.diffusers)] * len(
            rule.diffusers
        )
        for name, part in zip(rule.diffusers, torch.split(tensor, sizes, dim=0), strict=True):
            out[name] = part
    return out


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
