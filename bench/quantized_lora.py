"""How close a LoRA trained on a quantised base is to one trained on the full-precision base.

    python bench/quantized_lora.py --arch sdxl --steps 30 --out quantized_lora.json

Trains the same LoRA (same data, seed and steps) on the full-precision base and on fp8 / int8 / nf4 bases of
a family's tiny preset, applies each file to the full-precision base and compares its predictions with the
full-precision LoRA's on fixed inputs: ``rel_to_full_lora`` is
||pred_q - pred_full|| / ||pred_full - pred_base||, the share of the full LoRA's effect that differs.
Also reports the denoiser's stored bytes per kind.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from report import emit  # bench/report.py, beside this script

from eridiffusion.config import validate_config
from eridiffusion.data.shapes import write_shapes_dataset
from eridiffusion.models import build_family
from eridiffusion.models.quantize import quantize_module, weight_bytes
from eridiffusion.networks import apply_adapter_files
from eridiffusion.training.loop import load_or_build, train


def predict(family, size: int) -> torch.Tensor:  # noqa: ANN001
    gen = torch.Generator().manual_seed(0)
    noisy = torch.randn((4, *family.latent_shape(size, size)), generator=gen)
    with torch.no_grad():
        cond = family.encode_prompt(["a red circle", "a blue square", "a green triangle", ""])
        return family.predict(noisy, torch.tensor([100, 400, 700, 900]), cond).float()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sdxl", choices=["sd15", "sdxl", "sd3", "flux"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_family(args.arch, {"preset": "tiny"}, seed=0).save_pretrained(root / "base")
        write_shapes_dataset(root / "data", n=32, resolution=args.size, seed=0)
        files = {}
        for kind in ("none", "fp8", "int8", "nf4"):
            cfg = validate_config(
                {
                    "name": f"q_{kind}",
                    "output_dir": str(root / "out"),
                    "model": {"name_or_path": str(root / "base"), "quantize": kind},
                    "network": {"type": "lora", "linear": 8, "linear_alpha": 8},
                    "train": {
                        "steps": args.steps,
                        "batch_size": 4,
                        "lr": 5e-3,
                        "train_text_encoder": False,
                        "device": "cpu",
                        "mixed_precision": "no",
                    },
                    "save": {"every": args.steps},
                    "logging": {"progress": False, "tensorboard": False},
                    "datasets": [{"folder_path": str(root / "data"), "resolution": args.size}],
                }
            )
            files[kind] = train(cfg).output
            full = cfg.model.model_copy(update={"quantize": "none"})
            base = load_or_build(cfg.model_copy(update={"model": full}))  # loading would quantise it
            before = weight_bytes([base.modules()["denoiser"]])
            if kind != "none":
                quantize_module(base.modules()["denoiser"], kind)
            results[kind] = {
                "denoiser_mb": weight_bytes([base.modules()["denoiser"]]) / 2**20,
                "denoiser_mb_full": before / 2**20,
            }
        plain = load_or_build(
            cfg.model_copy(update={"model": cfg.model.model_copy(update={"quantize": "none"})})
        )
        p_base = predict(plain, args.size)
        outputs = {}
        for kind, path in files.items():
            family = load_or_build(
                cfg.model_copy(update={"model": cfg.model.model_copy(update={"quantize": "none"})})
            )
            apply_adapter_files(family, [(path, 1.0)])
            outputs[kind] = predict(family, args.size)
        effect = (outputs["none"] - p_base).norm()
        for kind in files:
            results[kind]["rel_to_full_lora"] = float((outputs[kind] - outputs["none"]).norm() / effect)
    report = {
        "arch": args.arch,
        "preset": "tiny",
        "steps": args.steps,
        "size": args.size,
        "torch": torch.__version__,
        "results": results,
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
