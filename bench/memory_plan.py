"""Pre-flight memory estimates (``eri plan``) at real size, and the estimator checked against measurements.

    python bench/memory_plan.py table --out memory_table.json       # real-size models, fake tensors
    python bench/memory_plan.py validate --out memory_validate.json  # small models, real CPU runs

``table``: Flux-dev, SD3.5 Large / Medium, SDXL and SD1.5, LoRA rank 16 on the attention layers, batch 1, bf16
autocast, bf16 frozen weights, latents and text embeddings cached (encoders off the GPU), AdamW; at 512 and
1024 px with gradient checkpointing off/on, and with an fp8 or nf4 base (checkpointing on).

``validate``: small configs are trained for two real steps on this CPU (fp32, everything resident) with the
trainer's own functions, and their peak is measured three ways -- the allocator's own events (torch profiler,
``profile_memory``), torch's ``MemTracker`` and the process's peak RSS growth -- beside the fake-tensor
estimate at 1-byte granularity (a CPU allocator does not round to 512 bytes).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from eridiffusion.config.schema import JobConfig
from eridiffusion.models import build_family
from eridiffusion.training.bench import synthetic_batch
from eridiffusion.training.memory_plan import estimate_memory
from eridiffusion.training.memory_report import GIB
from eridiffusion.training.memory_trace import frozen_safe_memtracker, memtracker_peak
from eridiffusion.training.optim import build_optimizer
from eridiffusion.training.stages import trainable_parameters
from eridiffusion.training.step import diffusion_loss

REAL = [("flux", "dev"), ("sd3", "large"), ("sd3", "medium"), ("sdxl", "full"), ("sd15", "full")]
TINY_FAMILY = {
    "resolution": 32,
    "patch_size": 2,
    "channels": [32, 64],
    "attention_levels": [False, True],
    "norm_num_groups": 8,
    "context_dim": 32,
    "text_layers": 1,
    "text_heads": 2,
    "max_tokens": 12,
}
SMALL = [  # (label, arch, options, resolution, batch): activations of a few hundred MB, above RSS noise
    ("tiny family", "tiny", TINY_FAMILY, 128, 8),
    ("sd15 tiny", "sd15", {"preset": "tiny"}, 512, 4),
    ("sdxl tiny", "sdxl", {"preset": "tiny"}, 512, 4),
    ("sd3 tiny", "sd3", {"preset": "tiny"}, 64, 32),
    ("flux tiny", "flux", {"preset": "tiny"}, 256, 4),
]


def job(arch: str, options: dict[str, Any], resolution: int, batch: int, **train: Any) -> JobConfig:
    cached = train.pop("cached", True)
    return JobConfig.model_validate(
        {
            "name": "plan",
            "model": {"arch": arch, "options": options, "dtype": train.pop("dtype", "bf16")},
            "network": {"type": "lora", "linear": 16, "linear_alpha": 16, "target": "attention"},
            "train": {"batch_size": batch, "train_text_encoder": False, "mixed_precision": "bf16", **train},
            "datasets": [
                {
                    "folder_path": "unused",
                    "resolution": resolution,
                    "cache_latents_to_disk": cached,
                    "cache_text_embeddings": cached,
                }
            ],
        }
    )


def table() -> list[dict[str, Any]]:
    rows = []
    variants = [("none", False), ("none", True), ("fp8", True), ("nf4", True)]
    for arch, preset in REAL:
        for resolution in (512, 1024):
            for quantize, checkpointing in variants:
                cfg = job(arch, {"preset": preset}, resolution, 1, gradient_checkpointing=checkpointing)
                e = estimate_memory(cfg, gpu_gb=24, quantize=quantize)
                rows.append(e.as_dict())
                print(
                    f"{arch} {preset} {resolution}px gc={checkpointing} {quantize}: "
                    f"{e.peak / GIB:.2f} GiB (weights {e.weights / GIB:.2f}, activations "
                    f"{e.activations / GIB:.2f}) in {e.trace_seconds:.1f} s",
                    flush=True,
                )
    return rows


def _vm(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def measured_run(cfg: JobConfig, how: str) -> int:
    """Peak bytes of building the model and two real training steps, as ``how`` sees it (``profiler``:
    allocator events; ``memtracker``: torch's tracker over the steps, the model counted as it enters;
    ``rss``: growth of the process's peak resident set)."""
    arch, options = cfg.model.arch, dict(cfg.model.options)
    assert arch is not None
    resolution, n = cfg.datasets[0].resolutions[0], cfg.train.batch_size
    rss_before = _vm("VmRSS")
    if how == "rss":
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # reset the peak-RSS mark
    profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True) if how == "profiler" else None
    if profiler is not None:
        profiler.__enter__()
    family = build_family(arch, options, seed=0)
    params = trainable_parameters(family, cfg)
    optimizer = build_optimizer(params, cfg.train.optimizer, cfg.train.lr)
    batch = synthetic_batch(n, resolution)
    tracker = None
    if how == "memtracker":
        tracker = frozen_safe_memtracker()
        tracker.track_external(*family.modules().values(), optimizer, batch.pixels)
        tracker.__enter__()
    for i in range(2):
        if tracker is not None:
            tracker.reset_mod_stats()  # it refuses a module called twice otherwise
        loss = diffusion_loss(family, batch, cfg, torch.Generator().manual_seed(i), torch.device("cpu"))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss
    if tracker is not None:
        tracker.__exit__(None, None, None)
        return memtracker_peak(tracker)
    if profiler is not None:
        profiler.__exit__(None, None, None)
        events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
        live = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            live += e.nbytes()
            peak = max(peak, live)
        return peak
    return _vm("VmHWM") - rss_before


def validate() -> list[dict[str, Any]]:
    rows = []
    for label, arch, options, resolution, n in SMALL:
        cfg = job(arch, options, resolution, n, mixed_precision="no", dtype="fp32", cached=False)
        started = time.perf_counter()
        estimate = estimate_memory(cfg, block=1)
        # the CPU run also holds its input batch in the measured memory; on a GPU the batch stays on the host
        host_batch = n * 3 * resolution * resolution * 4
        row: dict[str, Any] = {
            "config": f"{label}, {resolution} px, batch {n}, LoRA 16, fp32, encoders resident",
            "estimate_bytes": estimate.peak,
            "host_batch_bytes": host_batch,
            "estimate_seconds": round(time.perf_counter() - started, 2),
        }
        for how in ("profiler", "memtracker", "rss"):
            if how == "rss":  # a fresh process: a used heap hides growth behind memory freed earlier
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "rss",
                        "--index",
                        str(SMALL.index((label, arch, options, resolution, n))),
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                row["rss_bytes"] = int(out.strip().splitlines()[-1])
            else:
                row[f"{how}_bytes"] = measured_run(cfg, how)
            row[f"error_vs_{how}"] = round((estimate.peak + host_batch) / row[f"{how}_bytes"] - 1, 6)
            row[f"error_vs_{how}_without_batch"] = round(estimate.peak / row[f"{how}_bytes"] - 1, 6)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(path: str) -> str:
    """The ``table`` JSON as the README's table: peak GiB per model and resolution, one column per option."""
    rows = json.loads(Path(path).read_text(encoding="utf-8"))["rows"]
    cols = [("none", False), ("none", True), ("fp8", True), ("nf4", True)]
    names = {"dev": "Flux.1-dev", "large": "SD3.5 Large", "medium": "SD3.5 Medium", "full": ""}
    out = [
        "| model | px | no checkpointing | checkpointing | + fp8 base | + nf4 base |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    seen: dict[tuple[str, str, int], dict[tuple[str, bool], float]] = {}
    for r in rows:
        key = (r["arch"], r["model"], r["resolution"])
        seen.setdefault(key, {})[(r["quantize"], r["gradient_checkpointing"])] = r["peak"] / GIB
    for (arch, model, px), peaks in seen.items():
        label = names.get(model) or {"sdxl": "SDXL", "sd15": "SD1.5"}.get(arch, arch)
        out.append(f"| {label} | {px} | " + " | ".join(f"{peaks[c]:.1f}" for c in cols) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "what",
        choices=["table", "validate", "rss", "markdown"],
        help="rss: one validation run's RSS; markdown: print --out's table JSON as a Markdown table",
    )
    parser.add_argument("--out", default=None)
    parser.add_argument("--index", type=int, default=0, help="rss: which small config")
    args = parser.parse_args()
    if args.what == "markdown":
        print(markdown(args.out))
        return
    if args.what == "rss":
        _label, arch, options, resolution, n = SMALL[args.index]
        cfg = job(arch, options, resolution, n, mixed_precision="no", dtype="fp32", cached=False)
        print(measured_run(cfg, "rss"))
        return
    rows = table() if args.what == "table" else validate()
    result = {
        "what": args.what,
        "device": "estimated for a CUDA GPU" if args.what == "table" else "cpu (this machine)",
        "torch": torch.__version__,
        "host": platform.node(),
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
