"""Pre-flight memory estimate of a training step, without a GPU (``eri plan``).

The real-size model is built on fake tensors (``FakeTensorMode``: shapes and dtypes, no storage), frozen,
cast and given its adapter by the trainer's own :func:`trainable_parameters`, and one training step is
traced the way the config runs it -- resolution, batch, mixed precision, gradient checkpointing, cached or
live encoders, optimizer -- under :class:`LiveMemory`, which counts every storage an operator makes until
its last reference goes. The peak is split into frozen weights, trained weights, gradients, optimizer state,
caches and activations (the rest).

What the trace cannot see is modelled by bytes and said so in the notes: a quantised frozen base stores
its Linear weights in 1 byte (fp8/int8, plus one scale per output row) or 0.5 byte plus one fp32 scale per
64 weights (nf4), and each quantised layer dequantises its weight for the moment it runs; an 8-bit AdamW
keeps two uint8 states and a per-256 scale; block swap keeps the last N + 2 transformer blocks' frozen
weights on the host with two of them on the device at a time (the running one and the next one arriving,
see :mod:`.block_swap`). The device is assumed to be a CUDA GPU: ``mixed_precision: auto`` is bf16, sizes are
rounded to the caching allocator's 512-byte blocks, and the CUDA context and allocator slack are added
before the ``--gpu-gb`` check (see :mod:`.memory_report`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from eridiffusion.config.schema import JobConfig
from eridiffusion.data.cache import encoder_names
from eridiffusion.data.loader import Batch
from eridiffusion.models import Conditioning, ModelFamily, build_family, detect_arch
from eridiffusion.models.stable_diffusion import load_preset, preset_names
from eridiffusion.training.bench import synthetic_batch
from eridiffusion.training.bf16_weights import bf16_optimizer
from eridiffusion.training.block_swap import config_problem, swapped_blocks
from eridiffusion.training.memory_report import GIB, MemoryEstimate
from eridiffusion.training.memory_trace import (
    ALLOCATOR_BLOCK,
    CACHES,
    GRADS,
    OPTIMIZER,
    TRAINABLE,
    WEIGHTS,
    LiveMemory,
)
from eridiffusion.training.optim import build_optimizer
from eridiffusion.training.preservation import OutputPreservation
from eridiffusion.training.stages import single_stage_plan, trainable_parameters
from eridiffusion.training.step import loss_after_dropout

QUANTISED_BYTES = {"none": None, "fp8": 1.0, "int8": 1.0, "nf4": 0.5 + 4 / 64}
"""Bytes per frozen Linear weight of a quantised base (nf4: bitsandbytes' 64-weight blocks with an fp32
absmax each, no double quantisation); fp8/int8 add one fp32 scale per output row."""
REAL_PRESETS = {"sd15": "full", "sdxl": "full", "sd3": "large", "flux": "dev"}
"""The real-size preset used for a config that loads its weights from ``model.name_or_path``."""


def _loaded_preset(arch: str, path: Path) -> tuple[str | None, str]:
    """(the real-size preset a loaded model most likely is, how it was chosen): a diffusers folder's
    denoiser config matched against the presets', else a preset name in the path (``...-3.5-medium``),
    else the family's usual one."""
    real = [n for n in preset_names(arch) if "tiny" not in n]
    component = "unet" if arch in ("sd15", "sdxl") else "transformer"
    config_file = path / component / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        for name in real:
            wanted = {k: v for k, v in load_preset(arch, name)[component].items() if not k.startswith("_")}
            if all(config.get(k) == v for k, v in wanted.items()):
                return name, f"its {component} config matches the '{name}' preset"
    named = [n for n in real if n in path.name.lower()]
    if len(named) == 1:
        return named[0], f"'{named[0]}' in its name"
    default = REAL_PRESETS.get(arch)
    return default, "the family's usual size"


def _architecture(cfg: JobConfig, preset: str | None) -> tuple[str, dict[str, Any], list[str]]:
    """(arch, build options, notes): a from-scratch config as written, a loaded one at a real-size preset
    (its weights are not read: only shapes matter)."""
    options = dict(cfg.model.options)
    notes: list[str] = []
    arch = cfg.model.arch
    if cfg.model.name_or_path:
        path = Path(cfg.model.name_or_path)
        if arch is None and path.exists():
            arch = detect_arch(path)
        if arch is None:
            raise ValueError(
                f"eri plan: model.name_or_path '{path}' is not here to tell its family; set model.arch"
            )
        options = {k: v for k, v in options.items() if k != "preset"}
        chosen, how = (preset, "--preset") if preset else _loaded_preset(arch, path)
        if chosen is None:
            raise ValueError(f"eri plan: give --preset for a loaded {arch} model")
        options["preset"] = chosen
        notes.append(
            f"model.name_or_path's weights are not read: planned at the {arch} '{chosen}' preset ({how}; "
            "--preset to choose another)"
        )
    elif arch is None:
        raise ValueError("eri plan: set model.arch (or model.name_or_path)")
    elif preset is not None:
        options["preset"] = preset
    return arch, options, notes


def _amp(cfg: JobConfig) -> torch.dtype | None:
    """Autocast dtype on a CUDA GPU (``auto`` is bf16 there)."""
    return {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16, "no": None}[
        cfg.train.mixed_precision
    ]


def step_loss(
    family: ModelFamily, batch: Batch, cfg: JobConfig, gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    """:func:`eridiffusion.training.step.diffusion_loss` with no caption dropped: fake tensors cannot answer
    which captions the dropout draw dropped (``drop.tolist()``), and dropout changes no tensor size.
    Output preservation's two extra forward passes are traced too."""
    torch.rand(len(batch), generator=gen)  # the dropout draw, so the later draws are the trainer's

    def conditioning() -> Conditioning:
        return dict(batch.cond) if batch.cond is not None else family.encode_prompt(batch.captions)

    stage = single_stage_plan(cfg, family).config
    dop = OutputPreservation.for_stage(cfg, stage, cfg.datasets, family)
    extra = None if dop is None else functools.partial(dop.per_sample, family, batch.captions)
    return loss_after_dropout(family, batch, cfg, gen, device, conditioning, extra)


def _to_fake(
    family: ModelFamily, params: dict[str, nn.Parameter], mode: FakeTensorMode
) -> dict[str, nn.Parameter]:
    """Swap the meta-device model's tensors for fake CPU tensors (new parameter objects, so ``requires_grad``
    and the trainer's choices carry over); returns ``params`` re-pointed at the new objects.

    The model is built, cast and given its adapter on the meta device first because ``Module.to`` cannot
    change a fake parameter's dtype in place (it swaps tensors, which fake mode's weak references forbid),
    and the trainer casts with ``Module.to``."""
    device = torch.device("cpu")
    convert = mode.fake_tensor_converter
    new: dict[int, nn.Parameter] = {}
    for module in family.modules().values():
        for sub in module.modules():
            for key, p in list(sub._parameters.items()):
                if p is not None:
                    if id(p) not in new:
                        new[id(p)] = nn.Parameter(
                            convert.from_meta_and_device(mode, p, device), p.requires_grad
                        )
                    sub._parameters[key] = new[id(p)]
            for key, b in list(sub._buffers.items()):
                if b is not None:
                    sub._buffers[key] = convert.from_meta_and_device(mode, b, device)
    return {k: new[id(p)] for k, p in params.items()}


def _quantised_linear_weights(module: nn.Module) -> set[int]:
    """ids of the frozen Linear weights a quantised base stores in low precision (peft wraps them as
    ``base_layer``; adapters and non-Linear layers stay in their dtype)."""
    return {
        id(m.weight)
        for m in module.modules()
        if isinstance(m, nn.Linear) and not m.weight.requires_grad and m.weight.ndim == 2
    }


def _register_weights(
    tracker: LiveMemory,
    resident: dict[str, nn.Module],
    quantize: str,
    quantize_text: str,
    swapped: list[nn.Module],
) -> tuple[int, int]:
    """Count the device-resident tensors of ``resident``; returns (the bf16 bytes of the largest quantised
    weight -- its dequantised copy while the layer runs --, the most frozen bytes two consecutive swapped
    blocks hold: the one running and the one arriving)."""
    offloaded = {id(p) for b in swapped for p in [*b.parameters(), *b.buffers()] if not p.requires_grad}
    largest_dequant = 0
    for name, module in resident.items():
        scheme = (
            quantize if name == "denoiser" else quantize_text if name.startswith("text_encoder") else "none"
        )
        per_weight = QUANTISED_BYTES[scheme]
        quantised = _quantised_linear_weights(module) if per_weight is not None else set()
        for t in [*module.parameters(), *module.buffers()]:
            if id(t) in offloaded:  # known, so its views are not mistaken for new tensors; on the host
                tracker.track(t, WEIGHTS, 0)
                continue
            if t.requires_grad:
                tracker.track(t, TRAINABLE)
            elif id(t) in quantised:
                assert per_weight is not None
                scales = 0 if scheme == "nf4" else 4 * t.shape[0]
                tracker.track(t, WEIGHTS, int(t.numel() * per_weight) + scales)
                largest_dequant = max(largest_dequant, t.numel() * 2)
            else:
                tracker.track(t, WEIGHTS)
    sizes = [
        sum(p.numel() * p.element_size() for p in b.parameters() if not p.requires_grad) for b in swapped
    ]
    in_flight = max((a + b for a, b in zip(sizes, sizes[1:], strict=False)), default=sum(sizes))
    return largest_dequant, in_flight


def _eight_bit_state(params: list[nn.Parameter]) -> int:
    """bitsandbytes AdamW8bit: two uint8 states and an fp32 absmax per 256 values for tensors of at least
    4096 values, two fp32 states for smaller ones."""
    return sum(int(p.numel() * (2 + 8 / 256)) if p.numel() >= 4096 else 8 * p.numel() for p in params)


def _dataset_flags(cfg: JobConfig) -> tuple[int, bool, bool]:
    """(largest resolution, every batch from the latent cache, every caption from the text cache)."""
    resolution = max(r for d in cfg.datasets for r in d.resolutions)
    latents = all(d.cache_latents_to_disk for d in cfg.datasets)
    text = all(d.cache_text_embeddings for d in cfg.datasets)
    return resolution, latents, text


def estimate_memory(
    cfg: JobConfig,
    gpu_gb: float | None = None,
    preset: str | None = None,
    quantize: str | None = None,
    quantize_text_encoders: str | None = None,
    blocks_to_swap: int | None = None,
    resolution: int | None = None,
    fake: bool = True,
    block: int = ALLOCATOR_BLOCK,
) -> MemoryEstimate:
    """Trace one training step of ``cfg`` on fake tensors and return its peak device memory.

    ``fake=False`` runs the same trace on real CPU tensors (small models only: how the fake trace is
    checked against real runs); ``block`` is the allocation granularity (1: exact bytes, as a CPU
    allocator reports them).

    ``quantize`` / ``quantize_text_encoders`` / ``blocks_to_swap`` default to the config's
    ``model.quantize`` / ``model.quantize_text_encoders`` / ``train.blocks_to_swap``; ``resolution``
    defaults to the datasets' largest.
    """
    if cfg.pipeline is not None:
        raise ValueError("eri plan estimates single-stage jobs; plan each pipeline step as its own config")
    quantize = quantize or cfg.model.quantize
    quantize_text = quantize_text_encoders or cfg.model.quantize_text_encoders
    for where, value in (("quantize", quantize), ("quantize text_encoders", quantize_text)):
        if value not in QUANTISED_BYTES:
            raise ValueError(f"{where}: {value!r} is not one of {sorted(QUANTISED_BYTES)}")
    swap = cfg.train.blocks_to_swap if blocks_to_swap is None else blocks_to_swap
    problem = config_problem(cfg, swap)
    if problem:
        raise ValueError(problem)
    arch, options, notes = _architecture(cfg, preset)
    largest, latent_cache, text_cache = _dataset_flags(cfg)
    resolution = resolution or largest
    t, amp = cfg.train, _amp(cfg)
    device = torch.device("cpu")  # fake tensors stand for the GPU's
    started = time.perf_counter()
    with torch.device("meta" if fake else "cpu"):
        family = build_family(arch, options, seed=0)
        family.check_size(resolution, resolution)
        # quantised storage is counted by bytes below: the trainer's own quantisation needs real weights
        plain = cfg.model.model_copy(update={"quantize": "none", "quantize_text_encoders": "none"})
        params = trainable_parameters(family, cfg.model_copy(update={"model": plain}))
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    if isinstance(mode, FakeTensorMode):
        params = _to_fake(family, params, mode)
    with mode:
        modules = family.modules()
        image_names, text_names = encoder_names(family)
        trained = {n for n, m in modules.items() if any(p.requires_grad for p in m.parameters())}
        offloaded = set(image_names if latent_cache else []) | set(text_names if text_cache else [])
        offloaded -= trained  # the cache offload keeps components that train
        resident = {n: m for n, m in modules.items() if n not in offloaded}
        swapped = swapped_blocks(family, swap)
        tracker = LiveMemory(block)
        dequant, in_flight = _register_weights(tracker, resident, quantize, quantize_text, swapped)
        # caches are filled with only the encoders on the device; the denoiser is placed after they leave
        preparing = sum(
            p.numel() * p.element_size()
            for n in offloaded
            for p in [*modules[n].parameters(), *modules[n].buffers()]
        )
        batch = _fake_batch(family, cfg, resolution, latent_cache, text_cache, tracker)
        param_list = list(params.values())
        optimizer, state_bytes = _optimizer(cfg, params)
        tracker.cast_sources(param_list)
        hooks = [
            p.register_post_accumulate_grad_hook(lambda p: tracker.track(p.grad, GRADS)) for p in param_list
        ]
        with tracker:
            tracker.add_constant(WEIGHTS, dequant + in_flight)
            _materialise_state(tracker, optimizer, param_list, state_bytes)
            if t.gradient_accumulation_steps > 1:  # micro-batches after the first add into held gradients
                for p in param_list:
                    p.grad = torch.zeros_like(p)
                    tracker.track(p.grad, GRADS)
            tracker.reset_peak()
            with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
                loss = step_loss(family, batch, cfg, torch.Generator().manual_seed(0), device)
            loss.backward()
            del loss
            if t.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(param_list, t.max_grad_norm)
            if optimizer is not None:
                optimizer.step()
            for p in param_list:
                p.grad = None
        for h in hooks:
            h.remove()
    notes += _notes(quantize, quantize_text, swap, dequant, in_flight, t.optimizer.type, cfg)
    split = tracker.at_peak
    known = sum(split[k] for k in (WEIGHTS, TRAINABLE, GRADS, OPTIMIZER, CACHES))
    return MemoryEstimate(
        arch=arch,
        model=str(options.get("preset") or cfg.model.name_or_path or "options"),
        resolution=resolution,
        batch_size=t.batch_size,
        precision=str(amp).replace("torch.", "") if amp is not None else "fp32",
        weights_dtype=cfg.model.dtype,
        quantize=quantize if quantize_text == "none" else f"{quantize} (text encoders {quantize_text})",
        gradient_checkpointing=t.gradient_checkpointing,
        adapter=f"{cfg.network.type} rank {cfg.network.linear}" if cfg.network else "none (full fine-tune)",
        text_encoders="cached, off the device" if not set(text_names) & set(resident) else "on the device",
        vae="cached latents, off the device" if not set(image_names) & set(resident) else "on the device",
        optimizer=t.optimizer.type,
        blocks_to_swap=swap,
        weights=split[WEIGHTS],
        trainable=split[TRAINABLE],
        grads=split[GRADS],
        optimizer_state=split[OPTIMIZER],
        caches=split[CACHES],
        activations=tracker.peak - known,
        peak=tracker.peak,
        preparing=preparing,
        trace_seconds=round(time.perf_counter() - started, 2),
        gpu_gb=gpu_gb,
        notes=notes,
    )


def _fake_batch(
    family: ModelFamily,
    cfg: JobConfig,
    resolution: int,
    latent_cache: bool,
    text_cache: bool,
    tracker: LiveMemory,
) -> Batch:
    """One micro-batch as the loader gives it: pixels, or the cached latents / text embeddings (made here
    by the encoders, which is not part of the step, then counted as caches)."""
    synthetic = synthetic_batch(cfg.train.batch_size, resolution)
    latents = cond = None
    with torch.no_grad():
        if latent_cache:
            latents = family.encode_images(synthetic.pixels)
            tracker.track(latents, CACHES)
        if text_cache:
            cond = family.encode_prompt(synthetic.captions)
            for v in cond.values():
                tracker.track(v, CACHES)
    pixels = None if latent_cache else synthetic.pixels
    return dataclasses.replace(synthetic, pixels=pixels, latents=latents, cond=cond)


def _optimizer(
    cfg: JobConfig, params: dict[str, nn.Parameter]
) -> tuple[torch.optim.Optimizer | None, int | None]:
    """The trainer's optimizer, or (8-bit AdamW, whose kernels fake tensors cannot run) none and its state
    bytes."""
    o = cfg.train.optimizer
    if o.type == "adamw8bit":
        return None, _eight_bit_state(list(params.values()))
    optimizer = build_optimizer(params, o, cfg.train.lr)
    # bf16 trained weights: fp32 state, and one slice of weights widened to fp32 while it steps
    return bf16_optimizer(
        optimizer, o.type, cfg.train.weights_rounding, cfg.train.seed, "train.optimizer"
    ), None


def _materialise_state(
    tracker: LiveMemory,
    optimizer: torch.optim.Optimizer | None,
    params: list[nn.Parameter],
    state_bytes: int | None,
) -> None:
    """The optimizer state a step after the first holds (created by one step on zero gradients)."""
    if state_bytes is not None:
        tracker.add_constant(OPTIMIZER, state_bytes)
        return
    assert optimizer is not None
    with tracker.pause():
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        for p in params:
            p.grad = None
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.numel() > 1:
                tracker.track(v, OPTIMIZER)


def _notes(
    quantize: str, quantize_text: str, swap: int, dequant: int, in_flight: int, optimizer: str, cfg: JobConfig
) -> list[str]:
    notes = []
    if quantize != "none" or quantize_text != "none":
        notes.append(
            f"quantised base modelled by bytes ({quantize}: {QUANTISED_BYTES[quantize] or 0:.3g} byte per "
            f"frozen Linear weight) plus one dequantised layer in flight ({dequant / GIB:.2f} GiB)"
        )
    if swap:
        notes.append(
            f"block swap: {swap} fewer blocks on the device; the last {swap + 2} take turns in two places "
            f"({in_flight / GIB:.2f} GiB)"
        )
    if optimizer == "adamw8bit":
        notes.append("8-bit AdamW state counted by bytes (2 bytes per trained value + scales)")
    if cfg.model.dtype == "fp32" and cfg.train.mixed_precision != "no":
        notes.append("frozen weights are stored in fp32 (model.dtype); bf16 halves them")
    if cfg.train.weights_dtype == "bf16":
        notes.append(
            "trained weights and gradients in bf16 (train.weights_dtype); the optimizer steps a slice of "
            "them widened to fp32 at a time, counted in activations"
        )
    return notes
