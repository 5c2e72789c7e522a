"""``eri bench``: speed and memory of training steps for any family and preset, as JSON.

Random weights at the real sizes are enough to measure speed and memory, so nothing is downloaded.

Two FLOP counts are reported, both counted with torch's ``FlopCounterMode`` on real (untimed) steps:

- **model FLOPs**: the denoiser's forward and backward of the trained step, as the maths needs them -- the
  frozen VAE and text encoders that only prepare inputs (and that caches remove) are left out, and a step
  with gradient checkpointing is counted with it off, so recomputation is not credited. MFU (Chowdhery et
  al. 2022, "PaLM", appendix B) is model FLOPs per second over the device's peak.
- **hardware FLOPs**: everything the step as run computes (encoders and recomputation included); their rate
  over the peak is the hardware FLOPs utilisation (HFU).

torch's counter has no formula for the CPU flash-attention kernel that ``scaled_dot_product_attention``
uses on a CPU, so its formula (the same as the GPU flash kernels', whose backward recomputes Q K^T) is added
here; without it a CPU count misses every attention product.

Peaks are dense (no sparsity) bf16/fp16 tensor-core figures from the vendor datasheet named in
:data:`DEVICE_PEAKS`; they apply to bf16/fp16 runs, so an fp32 run gets an MFU only with ``peak_tflops``.
"""

from __future__ import annotations

import contextlib
import platform
import resource
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from eridiffusion.data.loader import Batch
from eridiffusion.models import build_family
from eridiffusion.training.engine import resolve_precision


@dataclass(frozen=True)
class DevicePeak:
    """A device's dense bf16 tensor-core peak, matched by a substring of ``torch.cuda.get_device_name``."""

    match: str
    tflops: float
    source: str


DEVICE_PEAKS = (  # the first match wins: more specific names first
    DevicePeak("H100 PCIe", 756.0, "NVIDIA H100 PCIe datasheet: 1,513 TFLOPS bf16 with sparsity, 756 dense"),
    DevicePeak("H100 NVL", 835.0, "NVIDIA H100 NVL datasheet: 1,671 TFLOPS bf16 with sparsity, 835 dense"),
    DevicePeak("H100", 989.0, "NVIDIA H100 SXM5 datasheet: 1,979 TFLOPS bf16 with sparsity, 989 dense"),
    DevicePeak("H200 NVL", 835.0, "NVIDIA H200 NVL datasheet: 1,671 TFLOPS bf16 with sparsity, 835 dense"),
    DevicePeak("H200", 989.0, "NVIDIA H200 SXM datasheet: 1,979 TFLOPS bf16 with sparsity, 989 dense"),
    DevicePeak("A100", 312.0, "NVIDIA A100 datasheet (SXM4 and PCIe): 312 TFLOPS bf16 dense"),
    DevicePeak("L40S", 362.0, "NVIDIA L40S datasheet: 733 TFLOPS bf16 with sparsity, 362 dense"),
    DevicePeak("L40", 181.0, "NVIDIA L40 datasheet: 362 TFLOPS bf16 with sparsity, 181 dense"),
    DevicePeak("L4", 121.0, "NVIDIA L4 datasheet: 242 TFLOPS bf16 with sparsity, 121 dense"),
    DevicePeak(
        "4090", 165.2, "NVIDIA Ada architecture whitepaper: RTX 4090 165.2 TFLOPS bf16 dense, FP32 accumulate"
    ),
    DevicePeak("A10", 125.0, "NVIDIA A10 datasheet: 250 TFLOPS bf16 with sparsity, 125 dense"),
)

_ATEN = torch.ops.aten


def _cpu_attention(q: Any, k: Any, v: Any, *_: Any, out_shape: Any = None, **__: Any) -> int:
    return sdpa_flop_count(q, k, v)


def _cpu_attention_backward(g: Any, q: Any, k: Any, v: Any, *_: Any, out_shape: Any = None, **__: Any) -> int:
    return sdpa_backward_flop_count(g, q, k, v)


CPU_ATTENTION_FLOPS = {
    _ATEN._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    _ATEN._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}
"""FLOP formulas for the CPU attention kernels, which torch's counter does not know."""


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter with the CPU attention kernels counted."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)


@dataclass
class BenchResult:
    arch: str
    options: dict[str, Any]
    device: str
    precision: str
    batch_size: int
    resolution: int
    gradient_checkpointing: bool
    compile: bool
    channels_last: bool
    tf32: bool
    params_total: int
    params_trained: int
    steps: int
    step_time_s: float
    samples_per_s: float
    peak_memory_gb: float
    model_flops_per_step: float
    """The denoiser's forward + backward of the trained step, without recomputation or frozen encoders."""
    hardware_flops_per_step: float
    """Everything the step as run computes (frozen encoders and gradient-checkpoint recomputation too)."""
    achieved_model_tflops: float
    achieved_hardware_tflops: float
    peak_tflops: float | None
    peak_source: str | None
    mfu: float | None
    """Model FLOPs utilisation: achieved model TFLOP/s over the peak."""
    hfu: float | None
    """Hardware FLOPs utilisation: achieved hardware TFLOP/s over the peak."""
    torch: str
    host: str


def device_peak(
    device: torch.device, amp: torch.dtype | None, given: float | None
) -> tuple[float | None, str | None]:
    """(peak TFLOP/s, where the figure comes from): ``given``, else the datasheet peak of a known GPU for a
    bf16/fp16 run; None for CPUs, unknown GPUs and fp32 runs (their peak is another figure)."""
    if given:
        return given, "given with --peak-tflops"
    if device.type != "cuda" or amp is None:
        return None, None
    name = torch.cuda.get_device_name(device)
    found = next((p for p in DEVICE_PEAKS if p.match in name), None)
    return (found.tflops, found.source) if found else (None, None)


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


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """TF32 matmuls and convolutions (CUDA Ampere and later) for the block; the settings are restored."""
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    if enabled:
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def prepare_denoiser(denoiser: nn.Module, channels_last: bool = False, compile: bool = False) -> None:
    """``channels_last``: NHWC storage of the 4-D (convolution) weights, which cuDNN's tensor-core kernels
    prefer; ``compile``: ``torch.compile`` of the module's forward, in place (the families keep calling the
    same object)."""
    if channels_last:
        denoiser.to(memory_format=torch.channels_last)
    if compile:
        denoiser.compile()


def _set_checkpointing(module: nn.Module, enabled: bool) -> bool:
    """Switch diffusers' gradient checkpointing; False when the module has no such switch."""
    name = "enable_gradient_checkpointing" if enabled else "disable_gradient_checkpointing"
    if not hasattr(module, name):
        return False
    getattr(module, name)()
    return True


def _denoiser_flops(counter: FlopCounterMode, denoiser: nn.Module) -> float:
    """The FLOPs the counter attributed to the denoiser (forward and backward): its module-tracker entry,
    named by the class, as the families call the denoiser itself."""
    counts = counter.get_flop_counts()
    name = type(denoiser).__name__
    if name not in counts:
        raise RuntimeError(f"the FLOP counter saw no call of the denoiser ({name}); saw {sorted(counts)}")
    return float(sum(counts[name].values()))


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
    *,
    compile: bool = False,
    channels_last: bool = False,
    tf32: bool = False,
) -> BenchResult:
    """Time ``steps`` full-fine-tune optimizer steps of the denoiser (after untimed counted steps and, with
    ``compile``, the compiling step). ``channels_last`` stores the denoiser's 4-D weights NHWC (convolution
    UNets); ``tf32`` allows TF32 for fp32 matmuls during the run."""
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
    prepare_denoiser(denoiser, channels_last=channels_last)
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

    with _tf32(tf32):
        model_flops, hardware_flops = _count_flops(step, denoiser, gradient_checkpointing)
        if compile:
            prepare_denoiser(denoiser, compile=True)
            step(-1)  # compiles
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
    model_rate, hardware_rate = model_flops / elapsed / 1e12, hardware_flops / elapsed / 1e12
    peak_tf, source = device_peak(device, amp, peak_tflops)
    return BenchResult(
        arch=arch,
        options=options,
        device=torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        precision=str(amp).replace("torch.", "") if amp is not None else "fp32",
        batch_size=batch_size,
        resolution=resolution,
        gradient_checkpointing=gradient_checkpointing,
        compile=compile,
        channels_last=channels_last,
        tf32=tf32,
        params_total=sum(p.numel() for m in family.modules().values() for p in m.parameters()),
        params_trained=sum(p.numel() for p in params),
        steps=steps,
        step_time_s=round(elapsed, 5),
        samples_per_s=round(batch_size / elapsed, 3),
        peak_memory_gb=round(peak, 3),
        model_flops_per_step=model_flops,
        hardware_flops_per_step=hardware_flops,
        achieved_model_tflops=round(model_rate, 4),
        achieved_hardware_tflops=round(hardware_rate, 4),
        peak_tflops=peak_tf,
        peak_source=source,
        mfu=round(model_rate / peak_tf, 4) if peak_tf else None,
        hfu=round(hardware_rate / peak_tf, 4) if peak_tf else None,
        torch=torch.__version__,
        host=platform.node(),
    )


def _count_flops(step: Any, denoiser: nn.Module, gradient_checkpointing: bool) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) from counted steps: model FLOPs with checkpointing off, hardware FLOPs
    as the step runs; one step when both are the same."""
    with flop_counter() as counter:
        step(0)
    model = _denoiser_flops(counter, denoiser)
    hardware = float(counter.get_total_flops())
    if gradient_checkpointing and _set_checkpointing(denoiser, True):
        with flop_counter() as counter:
            step(0)
        hardware = float(counter.get_total_flops())
    return model, hardware


def as_dict(result: BenchResult) -> dict[str, Any]:
    return asdict(result)
