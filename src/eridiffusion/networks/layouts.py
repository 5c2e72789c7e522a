"""kohya LoRA files in a model's original layout: the names sd-scripts writes for Flux (BFL) and SD3 (SAI).

diffusers' kohya-Flux converter, ComfyUI's generic ``lora_unet_<original key>`` map and Forge read Flux and
SD3 LoRAs by the original module names (``lora_unet_double_blocks_0_img_attn_qkv``,
``lora_unet_single_blocks_0_linear1``, ``lora_unet_joint_blocks_0_x_block_attn_qkv``). Several diffusers
layers are one fused original layer there (q/k/v; Flux's q/k/v/mlp ``linear1``), so their LoRAs are joined
the way sd-scripts saves its ``split_qkv`` networks: ``lora_down`` stacked by rank, ``lora_up``
block-diagonal (each part's rows take only its own rank columns), one ``alpha`` for the whole rank. The
update of every part is unchanged, and :func:`eridiffusion.networks.formats.split_fused` reads it back.
"""

from __future__ import annotations

import torch
from torch import nn

from eridiffusion.models.protocol import AdapterAliases, FusedLayer, ModelFamily

ORIGINAL_PREFIX = "lora_unet_"
# diffusers' kohya-Flux converter drops the .alpha of these layers (it applies scale 1), so their
# alpha/rank is folded into lora_up and alpha written equal to the rank: every loader then agrees
_ALPHA_IGNORED_BY_DIFFUSERS = ("lora_unet_final_layer_",)


def original_layout_targets(
    family: ModelFamily, layers: dict[tuple[str, str], nn.Module]
) -> dict[tuple[str, str], tuple[str, FusedLayer, int]]:
    """(component, module path) -> (original kohya name, the fused layer, this layer's part index), for
    every layer of ``family`` that its original layout names; empty for families without one."""
    if not isinstance(family, AdapterAliases):
        return {}
    found: dict[tuple[str, str], tuple[str, FusedLayer, int]] = {}
    for name, target in family.adapter_aliases().items():
        if not name.startswith(ORIGINAL_PREFIX):
            continue
        if not all((target.component, p) in layers for p in target.module_paths):
            continue
        for i, path in enumerate(target.module_paths):
            found[(target.component, path)] = (name, target, i)
    return found


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """The two row halves exchanged (BFL/SAI final adaLN stores shift, scale; diffusers scale, shift)."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def fuse_lora(
    name: str,
    target: FusedLayer,
    rows: list[int],
    parts: dict[int, tuple[torch.Tensor, torch.Tensor, float]],
) -> dict[str, torch.Tensor]:
    """kohya tensors of one original layer from the LoRAs of some of its parts.

    ``parts``: part index -> (lora_down, lora_up, alpha) at that part's own rank; ``rows``: every part's
    output rows (parts without a LoRA get zero rows). With R the summed rank, the file's update is
    ``(alpha_file / R) up @ down``; when every part has the same alpha/rank s, ``alpha_file = s R`` keeps
    the file's alpha meaningful, otherwise each block of ``up`` carries its own scale and alpha_file = R."""
    ranks = {i: down.shape[0] for i, (down, _, _) in parts.items()}
    scales = {i: alpha / ranks[i] for i, (_, _, alpha) in parts.items()}
    total = sum(ranks.values())
    fold = len(set(scales.values())) > 1 or name.startswith(_ALPHA_IGNORED_BY_DIFFUSERS)
    if len(target.module_paths) == 1 and not fold:
        down, up, alpha = parts[0]
        return _kohya(name, down, swap_halves(up) if target.swap_halves else up, alpha)
    if any(down.dim() != 2 for down, _, _ in parts.values()):
        raise ValueError(f"'{name}': only Linear layers join into a fused original layer")
    first_down = next(iter(parts.values()))[0]
    up = torch.zeros(sum(rows), total, dtype=first_down.dtype, device=first_down.device)
    downs = []
    col = 0
    for i in sorted(parts):
        down, part_up, _ = parts[i]
        row = sum(rows[:i])
        factor = scales[i] if fold else 1.0
        up[row : row + rows[i], col : col + ranks[i]] = part_up * factor
        downs.append(down)
        col += ranks[i]
    up = swap_halves(up) if target.swap_halves else up
    alpha = float(total) if fold else next(iter(scales.values())) * total
    return _kohya(name, torch.cat(downs, dim=0), up, alpha)


def _kohya(name: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    alpha_t = torch.tensor(alpha)
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": alpha_t}


def original_layout_tensors(
    family: ModelFamily,
    layers: dict[tuple[str, str], nn.Module],
    loras: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]],
    alphas: dict[tuple[str, str], tuple[float, int]],
) -> tuple[dict[str, torch.Tensor], set[tuple[str, str]]]:
    """The kohya tensors, in original-layout names, of every LoRA in ``loras`` ((component, path) ->
    (lora_A, lora_B) as peft holds them) whose layer the family's original layout names, and those layers.
    The rest keep the family's own kohya names."""
    targets = original_layout_targets(family, layers)
    grouped: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor, float]]] = {}
    covered: set[tuple[str, str]] = set()
    for key, (down, up) in loras.items():
        if key not in targets:
            continue
        name, _, index = targets[key]
        grouped.setdefault(name, {})[index] = (down, up, float(alphas[key][0]))
        covered.add(key)
    fused_layers = {name: target for name, target, _ in targets.values()}
    out: dict[str, torch.Tensor] = {}
    for name, parts in grouped.items():
        target = fused_layers[name]
        rows = [layers[(target.component, p)].weight.shape[0] for p in target.module_paths]
        out.update(fuse_lora(name, target, rows, parts))
    return out, covered
