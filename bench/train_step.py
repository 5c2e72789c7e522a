"""Training-step speed, memory and MFU for every family (``eri bench`` per preset), as one JSON document.

    python bench/train_step.py --presets tiny            # CPU-sized presets (CI machine)
    python bench/train_step.py --presets full --device cuda --batch-size 1 --mixed-precision bf16

Real-size presets use random weights: speed and memory do not depend on the values.
"""

from __future__ import annotations

import argparse
import sys

from report import emit  # bench/report.py, beside this script

from eridiffusion.training.bench import as_dict, run_bench

PRESETS = {
    "tiny": [
        ("tiny", {}),
        ("sd15", {"preset": "tiny"}),
        ("sdxl", {"preset": "tiny"}),
        ("sd3", {"preset": "tiny"}),
        ("flux", {"preset": "tiny"}),
    ],
    "full": [
        ("sd15", {"preset": "full"}),
        ("sdxl", {"preset": "full"}),
        ("sd3", {"preset": "medium"}),
        ("sd3", {"preset": "large"}),
        ("flux", {"preset": "dev"}),
        ("flux", {"preset": "schnell"}),
    ],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--mixed-precision", default="auto")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--out", default=None, help="write the JSON here too")
    args = parser.parse_args()
    results = []
    for arch, options in PRESETS[args.presets]:
        try:
            results.append(
                as_dict(
                    run_bench(
                        arch,
                        options,
                        args.batch_size,
                        None,
                        args.steps,
                        args.device,
                        args.mixed_precision,
                        args.gradient_checkpointing,
                    )
                )
            )
        except (RuntimeError, ValueError) as exc:  # e.g. out of memory on a small device: record, go on
            results.append({"arch": arch, "options": options, "error": f"{type(exc).__name__}: {exc}"[:500]})
    emit({"benchmark": "train_step", "results": results}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
