"""bf16 trained weights (``train.weights_dtype: bf16``) against fp32 master weights: loss, weights, memory.

    python bench/bf16_weights.py --out bf16_weights.json [--steps 200] [--lrs 1e-4 1e-5] [--no-plan]

``trajectory``: ``eri train`` full fine-tunes of the tiny family (denoiser and text encoder trained, 16 px
shapes, batch 8, AdamW, bf16 autocast in every run) with fp32 master weights, and with bf16 weights rounded
stochastically, with Kahan compensation, or to nearest. Reported per run: the mean loss of the last 20 steps,
the mean |loss - fp32 loss| over the same steps (same batches and noise in every run), the distance of the
final weights from the fp32 run's, the bytes of trained weights + gradients + optimizer state (by dtype), and
the tensor bytes of the model folder the run saved (measured).

``plan``: the pre-flight estimate (``eri plan``, fake tensors) of a real-size SDXL UNet full fine-tune at
1024 px, batch 1, gradient checkpointing, cached latents and text embeddings, AdamW and 8-bit AdamW, with
fp32 or bf16 trained weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from memory_plan import TINY_FAMILY  # bench/memory_plan.py, beside this script
from safetensors.torch import load_file

from eridiffusion.cli import main as eri
from eridiffusion.config.schema import JobConfig
from eridiffusion.training.memory_plan import estimate_memory
from eridiffusion.training.memory_report import GIB

TINY = {**TINY_FAMILY, "resolution": 16, "channels": [16, 32]}
"""The tiny family at 16 px (the tests' size), so the runs take seconds."""
RUNS = [
    ("fp32 master", "fp32", "stochastic"),
    *(("bf16 " + r, "bf16", r) for r in ("stochastic", "kahan", "nearest")),
]
STATE_BYTES = {"fp32": 4 + 4, "bf16": 2 + 2}
"""Weight + gradient bytes per trained value; AdamW adds 8 (two fp32 moments) either way, Kahan 2 more."""


def _job(root: Path, name: str, steps: int, lr: float, weights: str, rounding: str) -> dict[str, Any]:
    return {
        "name": name,
        "output_dir": str(root / "output"),
        "model": {"arch": "tiny", "options": TINY},
        "train": {
            "steps": steps,
            "batch_size": 8,
            "lr": lr,
            "seed": 3,
            "mixed_precision": "bf16",
            "max_grad_norm": None,
            "optimizer": {"type": "adamw", "weight_decay": 0.01},
            "weights_dtype": weights,
            "weights_rounding": rounding,
        },
        "save": {"every": steps, "keep": 1},
        "sample": {"prompts": []},
        "logging": {"progress": False, "tensorboard": False, "log_every": 1},
        "datasets": [
            {
                "folder_path": str(root / "shapes"),
                "resolution": 16,
                "synthetic": {"kind": "shapes", "n": 256, "resolution": 16, "seed": 0},
            }
        ],
    }


def trajectory(steps: int, lr: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        reference: list[float] = []
        ref_weights: dict[str, torch.Tensor] = {}
        for i, (label, weights, rounding) in enumerate(RUNS):
            path = root / f"run{i}.yaml"
            path.write_text(
                yaml.safe_dump(_job(root, f"run{i}", steps, lr, weights, rounding)), encoding="utf-8"
            )
            started = time.perf_counter()
            if eri(["train", str(path)]) != 0:
                raise RuntimeError(f"{label}: eri train failed")
            seconds = time.perf_counter() - started
            run = root / "output" / f"run{i}"
            losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
            final = load_file(run / "checkpoints" / f"step_{steps:06d}" / "trainable.safetensors")
            saved = [t for f in (run / "model").rglob("*.safetensors") for t in load_file(f).values()]
            if not reference:
                reference, ref_weights = losses, final
            values = sum(t.numel() for t in final.values())
            distance = sum((final[k].float() - ref_weights[k].float()).pow(2).sum() for k in final) ** 0.5
            extra = 2 if rounding == "kahan" and weights == "bf16" else 0
            rows.append(
                {
                    "run": label,
                    "lr": lr,
                    "steps": steps,
                    "final_loss": sum(losses[-20:]) / 20,
                    "gap_to_fp32": sum(abs(a - b) for a, b in zip(losses[-20:], reference[-20:], strict=True))
                    / 20,
                    "weight_distance_to_fp32": float(distance),
                    "trained_values": values,
                    "weight_and_grad_bytes": values * STATE_BYTES[weights],
                    "saved_model_bytes": sum(t.numel() * t.element_size() for t in saved),
                    "optimizer_state_bytes": values * (8 + extra),
                    "seconds": round(seconds, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def plan() -> list[dict[str, Any]]:
    rows = []
    for optimizer in ("adamw", "adamw8bit"):
        for weights in ("fp32", "bf16"):
            cfg = JobConfig.model_validate(
                {
                    "name": "plan",
                    "model": {"arch": "sdxl", "options": {"preset": "full"}, "dtype": "bf16"},
                    "train": {
                        "batch_size": 1,
                        "train_text_encoder": False,
                        "mixed_precision": "bf16",
                        "gradient_checkpointing": True,
                        "weights_dtype": weights,
                        "optimizer": {"type": optimizer},
                    },
                    "datasets": [
                        {
                            "folder_path": "unused",
                            "resolution": 1024,
                            "cache_latents_to_disk": True,
                            "cache_text_embeddings": True,
                        }
                    ],
                }
            )
            e = estimate_memory(cfg, gpu_gb=24)
            row = {**e.as_dict(), "trained_weights_dtype": weights}  # as_dict's weights_dtype: the frozen
            rows.append(row)
            print(f"SDXL full fine-tune 1024 px {optimizer} {weights}: {e.peak / GIB:.2f} GiB", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 1e-5])
    parser.add_argument("--no-plan", action="store_true", help="skip the real-size SDXL estimate (~2 min)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result: dict[str, Any] = {
        "device": f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "trajectory": [row for lr in args.lrs for row in trajectory(args.steps, lr)],
    }
    if not args.no_plan:
        result["plan"] = plan()
    args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
