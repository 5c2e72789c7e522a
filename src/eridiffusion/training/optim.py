"""Optimizer construction with the usual no-decay groups."""

from __future__ import annotations

import torch
from torch import nn

from eridiffusion.config.schema import OptimizerConfig


def _no_decay(name: str, p: nn.Parameter) -> bool:
    """Biases, norm scales and embeddings: weight decay only shrinks them towards zero for no benefit."""
    lowered = name.lower()
    return p.ndim < 2 or "norm" in lowered or "embedding" in lowered


def _fusable(params: dict[str, nn.Parameter]) -> bool | None:
    """torch's fused AdamW (one kernel for all tensors; 2x faster than the per-tensor loop on CPU too) takes
    plain floating-point tensors on CPU or CUDA; sharded (FSDP) tensors keep the default implementation."""
    ok = all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") and type(p.data) is torch.Tensor
        for p in params.values()
    )
    return True if ok and params else None


def build_optimizer(
    params: dict[str, nn.Parameter], cfg: OptimizerConfig, lr: float
) -> torch.optim.Optimizer:
    decay = [p for n, p in params.items() if not _no_decay(n, p)]
    no_decay = [p for n, p in params.items() if _no_decay(n, p)]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.type == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, fused=_fusable(params))
    if cfg.type == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise RuntimeError(
                "train.optimizer.type=adamw8bit needs bitsandbytes: pip install bitsandbytes"
            ) from exc
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.type == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.betas[0])
    raise ValueError(f"unknown optimizer {cfg.type!r}")
