"""Optimizer construction with the usual no-decay groups, for every optimizer the config names.

Optional optimizers live in their own packages (prodigyopt, schedulefree, came-pytorch, bitsandbytes) and
are imported only when chosen, so a missing one is a "pip install X" message rather than an import error
at start-up. ``train.optimizer.params`` are checked against the constructor's signature before anything
is built, so ``eri validate`` reports a misspelt argument with its YAML path.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from eridiffusion.config.schema import SCHEDULE_FREE, OptimizerConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimizerSpec:
    """Where an optimizer class lives and which of the shared settings it takes."""

    module: str
    attr: str
    pip: str | None
    """Package to install when the import fails; None for torch's own."""
    takes: frozenset[str] = frozenset()
    """Shared settings passed to it: ``betas`` and/or ``eps`` (each optimizer names the rest itself)."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """Constructor arguments set unless ``params`` overrides them."""


ADAM_LIKE = frozenset({"betas", "eps"})

OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("torch.optim", "AdamW", None, ADAM_LIKE),
    "adamw8bit": OptimizerSpec("bitsandbytes.optim", "AdamW8bit", "bitsandbytes", ADAM_LIKE),
    "sgd": OptimizerSpec("torch.optim", "SGD", None),
    "prodigy": OptimizerSpec("prodigyopt", "Prodigy", "prodigyopt", frozenset({"eps"})),
    # fixed LR by default (what LoRA guides use); params.relative_step: true gives the paper's step size
    "adafactor": OptimizerSpec(
        "transformers.optimization",
        "Adafactor",
        "transformers",
        defaults={"scale_parameter": False, "relative_step": False, "warmup_init": False},
    ),
    "lion": OptimizerSpec("bitsandbytes.optim", "Lion", "bitsandbytes"),
    "lion8bit": OptimizerSpec("bitsandbytes.optim", "Lion8bit", "bitsandbytes"),
    "adamw_schedulefree": OptimizerSpec("schedulefree", "AdamWScheduleFree", "schedulefree", ADAM_LIKE),
    "came": OptimizerSpec("came_pytorch", "CAME", "came-pytorch"),
}

_OURS = {
    "lr": "train.lr",
    "weight_decay": "train.optimizer.weight_decay",
    "params": "the trained parameters",
}


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


def optimizer_class(kind: str, where: str = "train.optimizer") -> type[torch.optim.Optimizer]:
    """Import the optimizer class; a ValueError naming the package to install when it is missing."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {kind!r}; choose one of {sorted(OPTIMIZERS)}")
    spec = OPTIMIZERS[kind]
    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:
        raise ValueError(f"{where}.type={kind} needs {spec.pip}: pip install {spec.pip}") from exc
    return getattr(module, spec.attr)


def _constructor_args(cls: type) -> tuple[set[str], bool]:
    """Names the constructor accepts (less self/params) and whether it takes ``**kwargs``."""
    sig = inspect.signature(cls.__init__)
    names = {n for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    return names - {"self", "params"}, takes_any


def optimizer_problems(cfg: OptimizerConfig, where: str = "train.optimizer") -> list[str]:
    """Every problem building ``cfg`` would hit, without building it (``eri validate`` lists them)."""
    try:
        cls = optimizer_class(cfg.type, where)
    except ValueError as exc:
        return [str(exc)]
    accepted, takes_any = _constructor_args(cls)
    problems = []
    for key in cfg.params:
        if key in _OURS:
            problems.append(f"{where}.params.{key}: set it as {_OURS[key]} instead")
        elif key not in accepted and not takes_any:
            problems.append(
                f"{where}.params.{key}: {cls.__name__} has no argument {key!r}; "
                f"it takes: {', '.join(sorted(accepted - set(_OURS)))}"
            )
    return problems


def _kwargs(cfg: OptimizerConfig, lr: float) -> dict[str, Any]:
    spec = OPTIMIZERS[cfg.type]
    kwargs: dict[str, Any] = {"lr": lr, **spec.defaults}
    # Lion and Prodigy have their own beta defaults; pass ours only to Adam-likes or when the user set them
    if "betas" in spec.takes or (
        "betas" in cfg.model_fields_set and cfg.type in ("lion", "lion8bit", "prodigy")
    ):
        kwargs["betas"] = cfg.betas
    if "eps" in spec.takes:
        kwargs["eps"] = cfg.eps
    if cfg.type == "sgd":
        kwargs["momentum"] = cfg.betas[0]
    kwargs.update(cfg.params)
    if cfg.type == "adafactor" and kwargs.get("relative_step"):
        kwargs["lr"] = None  # Adafactor refuses an explicit LR together with its relative step size
    return kwargs


def build_optimizer(
    params: dict[str, nn.Parameter], cfg: OptimizerConfig, lr: float, where: str = "train.optimizer"
) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names over ``params``, with weight decay only on matrices.

    Schedule-free optimizers are returned in train mode; wrap sampling and export in
    :func:`eval_mode` so they see the averaged weights.
    """
    problems = optimizer_problems(cfg, where)
    if problems:
        raise ValueError("; ".join(problems))
    decay = [p for n, p in params.items() if not _no_decay(n, p)]
    no_decay = [p for n, p in params.items() if _no_decay(n, p)]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    cls = optimizer_class(cfg.type, where)
    if cfg.type == "prodigy" and lr < 0.1:
        logger.warning(
            "prodigy estimates the step size itself and expects train.lr near 1.0; lr %g scales its estimate "
            "down and will train very slowly",
            lr,
        )
    kwargs = _kwargs(cfg, lr)
    if cfg.type == "adamw" and "fused" not in kwargs and "foreach" not in kwargs:
        kwargs["fused"] = _fusable(params)
    try:
        optimizer = cls(groups, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {cls.__name__} refused its settings: {exc}") from None
    if cfg.type in SCHEDULE_FREE:
        optimizer.train()
    return optimizer


@contextlib.contextmanager
def eval_mode(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Schedule-free optimizers keep training weights apart from the averaged ones they return; swap the
    averaged ones in for sampling, evaluation and export. A no-op for every other optimizer."""
    swaps = callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))
    if swaps:
        optimizer.eval()
    try:
        yield
    finally:
        if swaps:
            optimizer.train()
