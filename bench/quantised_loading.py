"""Peak host memory of preparing a quantised base: load whole then quantise, against quantise while loading.

    python bench/quantised_loading.py --out quantised_loading.json

Writes a Flux-architecture transformer of a few hundred MB (random weights, bf16, a diffusers folder in a
temporary directory, deleted afterwards), then loads it in fresh subprocesses, one per mode and kind, and
reports each child's peak resident set size over its size before loading: ``whole`` is ``from_pretrained``
in bf16 followed by ``quantize_module`` (what training did before); ``streamed`` is :func:`load_pretrained`
under :func:`quantising_loads` (what ``model.quantize`` does now).

Importing torch, diffusers, transformers, torchao and bitsandbytes alone peaks near 1.5 GB, above what
loading adds, so the lifetime peak (``ru_maxrss``, also reported) hides the difference: after its imports each
child resets the kernel's peak-RSS mark (``/proc/self/clear_refs``, Linux) and reads ``VmHWM`` after loading.
``peak_over_start_mb`` = that peak minus the RSS before loading.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from report import emit  # bench/report.py, beside this script

MB = 2**20


def child(mode: str, kind: str, folder: Path) -> dict[str, float | str]:
    """Runs in a fresh process: load the transformer one way and report the process's peak RSS."""
    from diffusers import FluxTransformer2DModel

    from eridiffusion.models.quantize import quantize_module, weight_bytes
    from eridiffusion.models.streamed_loading import load_pretrained, quantising_loads

    torch.set_num_threads(1)
    # first use of a quantiser imports and initialises more (torch._dynamo for torchao): not the model's cost
    quantize_module(torch.nn.Sequential(torch.nn.ModuleDict({"blocks": torch.nn.Linear(256, 256)})), kind)
    Path("/proc/self/clear_refs").write_text("5", encoding="ascii")  # reset the peak RSS mark
    before = _status_mb("VmRSS")
    start = time.perf_counter()
    if mode == "whole":
        model = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
        quantize_module(model, kind)
    elif mode == "streamed":
        with quantising_loads(kind, "none", torch.bfloat16):
            model = load_pretrained(FluxTransformer2DModel, folder, "transformer", torch.bfloat16, None)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    seconds = time.perf_counter() - start
    peak = _status_mb("VmHWM")
    return {
        "mode": mode,
        "kind": kind,
        "rss_before_mb": before,
        "peak_rss_mb": peak,
        "peak_over_start_mb": peak - before,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "model_mb": weight_bytes([model]) / MB,
        "seconds": seconds,
    }


def _status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (kB) in MB."""
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} (this benchmark needs Linux)")


def _config(width: int, double: int, single: int) -> dict[str, object]:
    heads = width // 128
    return {
        "attention_head_dim": 128,
        "num_attention_heads": heads,
        "num_layers": double,
        "num_single_layers": single,
        "in_channels": 64,
        "joint_attention_dim": 256,
        "pooled_projection_dim": 128,
        "guidance_embeds": True,
        "axes_dims_rope": [16, 56, 56],
    }


def run_child(mode: str, kind: str, folder: Path) -> dict[str, float | str]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, kind, str(folder)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024, help="hidden size (multiple of 128)")
    parser.add_argument("--double", type=int, default=4, help="double-stream blocks")
    parser.add_argument("--single", type=int, default=8, help="single-stream blocks")
    parser.add_argument("--kinds", nargs="+", default=["int8", "nf4"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=3, metavar=("MODE", "KIND", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], Path(args.child[2]))))
        return 0
    from diffusers import FluxTransformer2DModel

    config = _config(args.width, args.double, args.single)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "transformer"
        torch.manual_seed(0)
        model = FluxTransformer2DModel.from_config(config).to(torch.bfloat16)
        bf16_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / MB
        model.save_pretrained(folder)
        del model
        rows = [run_child(mode, kind, folder) for kind in args.kinds for mode in ("whole", "streamed")]
    report = {
        "model": {"class": "FluxTransformer2DModel", **config, "bf16_mb": bf16_mb},
        "rows": rows,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "date": time.strftime("%Y-%m-%d"),
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
