"""Block swap's saving and price on a Flux-shaped transformer's LoRA step: peak device memory and step time
with ``blocks_to_swap`` 0 and N, gradient checkpointing on, the same random inputs, one warm-up step.

    python bench/block_swap.py [--heads 24 --layers 2 --single-layers 8 --swap 6 --tokens 1024] [--out F]

On CUDA the peak is ``torch.cuda.max_memory_allocated`` and the copies run on the side stream; on a CPU the
device is the host, so only the hooks' time overhead shows (the peak is left empty). The losses of the two
runs are printed too: block swap must not change them.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from peft import LoraConfig, inject_adapter_in_model
from report import emit  # bench/report.py, beside this script

from eridiffusion.training.block_swap import BlockSwap


def build(args: argparse.Namespace, dtype: torch.dtype) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        in_channels=64,
        num_layers=args.layers,
        num_single_layers=args.single_layers,
        attention_head_dim=128,
        num_attention_heads=args.heads,
        joint_attention_dim=args.text_dim,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ).to(dtype)
    model.requires_grad_(False)
    lora = LoraConfig(r=16, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    model = inject_adapter_in_model(lora, model)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
    model.enable_gradient_checkpointing()
    return model


def inputs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    side = int(args.tokens**0.5)
    rows = torch.arange(side).repeat_interleave(side)
    cols = torch.arange(side).repeat(side)
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=1).float()
    made = {
        "hidden_states": torch.randn(1, side * side, 64, generator=gen),
        "encoder_hidden_states": torch.randn(1, args.text_tokens, args.text_dim, generator=gen),
        "pooled_projections": torch.randn(1, 768, generator=gen),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(args.text_tokens, 3),
    }
    return {
        k: v.to(device, dtype if v.ndim == 3 or k == "pooled_projections" else torch.float32)
        for k, v in made.items()
    }


def run(args: argparse.Namespace, swap: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    model = build(args, dtype)
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    hooks = BlockSwap(blocks[len(blocks) - swap - 2 :], device) if swap else None
    if hooks is not None:
        hooks.place(model)
    else:
        model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    batch = inputs(args, device, dtype)
    losses, times = [], []
    cuda = device.type == "cuda"
    for step in range(args.steps + 1):
        if cuda and step == 1:
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        out = model(**batch, return_dict=False)[0]
        loss = out.float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())  # one sync a step, as the trainer's metrics
        if step:
            times.append(time.perf_counter() - started)
    weights = sum(p.numel() * p.element_size() for b in blocks for p in b.parameters() if not p.requires_grad)
    return {
        "blocks_to_swap": swap,
        "step_s": sorted(times)[len(times) // 2],
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "block_weights_gib": weights / 2**30,
        "copies_per_step": (hooks.copies / (args.steps + 1)) if hooks else 0,
        "losses": losses,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=None, help="attention heads of 128 (Flux-dev: 24)")
    p.add_argument("--layers", type=int, default=2, help="double-stream blocks")
    p.add_argument("--single-layers", type=int, default=8, help="single-stream blocks")
    p.add_argument("--swap", type=int, default=6, help="blocks_to_swap for the second run")
    p.add_argument("--tokens", type=int, default=None, help="image tokens (1024 px: 4096; a square)")
    p.add_argument("--text-tokens", type=int, default=128)
    p.add_argument("--text-dim", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    args.heads = args.heads or (24 if cuda else 2)
    args.tokens = args.tokens or (4096 if cuda else 256)
    if args.swap > args.layers + args.single_layers - 2:
        p.error("--swap: at most the block count minus 2")
    dtype = torch.bfloat16 if cuda else torch.float32
    results = [run(args, n, device, dtype) for n in (0, args.swap)]
    report = {
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or 'x86_64'})",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "runs": results,
        "same_losses": results[0]["losses"] == results[1]["losses"],
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
