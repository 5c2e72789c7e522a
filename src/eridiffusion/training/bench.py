"""``eri bench``: speed and memory of training steps for any family and preset, as JSON.

Random weights at the real sizes are enough to measure speed and memory, so nothing is downloaded. MFU is
model FLOPs per second (counted once with torch's FlopCounterMode on a real step) over the device's peak;
the peak is looked up for known GPUs or given with ``peak_tflops``.
"""

from __future__ import annotations

import platform
import resource
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from eridiffusion.data.loader import Batch
from eridiffusion.models import build_family
from eridiffusion.training.engine import resolve_precision

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0, "A10": 125.0}
"""Dense bf16 tensor-core peaks (no sparsity) by device-name substring."""


@dataclass
class BenchResult:
    arch: str
    options: dict[str, Any]
    device: str
    precision: str
    batch_size: int
    resolution: int
    params_total: int
    params_trained: int
    steps: int
    step_time_s: float
    samples_per_s: float
    peak_memory_gb: float
    flops_per_step: float
    achieved_tflops: float
    mfu: float | None
    torch: str
    host: str


def _peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def synthetic_batch(batch_size: int, resolution: int, seed: int = 0) -> Batch:
    """A micro-batch as the loader gives it (random pixels, one caption, SDXL's size conditioning), for
    benchmarks and memory plans that need no dataset."""
    g = torch.Generator().manual_seed(seed)
    return Batch(
        pixels=torch.rand((batch_size, 3, resolution, resolution), generator=g) * 2 - 1,
        captions=["a photo of a red circle on a table"] * batch_size,
        dropout_rates=torch.zeros(batch_size),
        epoch=0,
        loss_weights=torch.ones(batch_size),
        original_sizes=torch.full((batch_size, 2), resolution),
        crops=torch.zeros(batch_size, 2, dtype=torch.long),
    )


def run_bench(
    arch: str,
    options: dict[str, Any],
    batch_size: int,
    resolution: int | None,
    steps: int,
    device_name: str = "auto",
    mixed_precision: str = "auto",
    gradient_checkpointing: bool = False,
    peak_tflops: float | None = None,
) -> BenchResult:
    """Time ``steps`` full-fine-tune optimizer steps of the denoiser (after one untimed warm-up step)."""
    from eridiffusion.config.schema import JobConfig
    from eridiffusion.device import resolve_device
    from eridiffusion.training.step import diffusion_loss

    device = resolve_device(device_name)
    amp = resolve_precision(mixed_precision, device)
    family = build_family(arch, options, seed=0).to(device)
    resolution = resolution or family.default_resolution()
    denoiser = family.modules()["denoiser"]
    for name, module in family.modules().items():
        module.requires_grad_(name == "denoiser")
        module.train(name == "denoiser")
    if gradient_checkpointing and hasattr(denoiser, "enable_gradient_checkpointing"):
        denoiser.enable_gradient_checkpointing()
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    cfg = JobConfig.model_validate({"name": "bench", "datasets": [{"folder_path": "."}]})
    batch = synthetic_batch(batch_size, resolution)

    def step(i: int) -> None:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = diffusion_loss(family, batch, cfg, torch.Generator().manual_seed(i), device)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with FlopCounterMode(display=False) as counter:
        step(0)
    flops = float(counter.get_total_flops())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    start = time.perf_counter()
    for i in range(steps):
        step(i + 1)
    sync()
    elapsed = (time.perf_counter() - start) / steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    achieved = flops / elapsed / 1e12
    peak_tf = _peak_tflops(device, peak_tflops)
    return BenchResult(
        arch=arch,
        options=options,
        device=torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        precision=str(amp).replace("torch.", "") if amp is not None else "fp32",
        batch_size=batch_size,
        resolution=resolution,
        params_total=sum(p.numel() for m in family.modules().values() for p in m.parameters()),
        params_trained=sum(p.numel() for p in params),
        steps=steps,
        step_time_s=round(elapsed, 5),
        samples_per_s=round(batch_size / elapsed, 3),
        peak_memory_gb=round(peak, 3),
        flops_per_step=flops,
        achieved_tflops=round(achieved, 4),
        mfu=round(achieved / peak_tf, 4) if peak_tf else None,
        torch=torch.__version__,
        host=platform.node(),
    )


def as_dict(result: BenchResult) -> dict[str, Any]:
    return asdict(result)
