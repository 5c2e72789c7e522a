"""Data-pipeline throughput: scanning + bucketing, batch loading (in memory, decoded per batch, with
workers), and tiny-family training steps with and without the latent / text-embedding caches.

    python bench/data.py [--images 256] [--photos 64] [--steps 40] [--out bench/data.json]

Prints one JSON object (and writes it to --out). Everything is generated locally in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from report import emit  # bench/report.py, beside this script

from eridiffusion.config.schema import DatasetConfig, JobConfig
from eridiffusion.data import loader as loader_module
from eridiffusion.data.folder import scan_folder
from eridiffusion.data.loader import TrainingData
from eridiffusion.training.loop import train

TINY = {"resolution": 32, "patch_size": 2, "channels": [32, 64, 64], "attention_levels": [False, True, True]}


def write_images(folder: Path, n: int, low: int, high: int, seed: int) -> None:
    """n JPEG/PNG images of random sizes in [low, high] px with tag captions: smooth noise, so JPEG sizes
    and decode costs are photo-like rather than those of flat colour."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = (int(x) for x in rng.integers(low, high + 1, 2))
        coarse = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR)
        img.save(folder / f"{i:05d}.{'jpg' if i % 2 else 'png'}", quality=90)
        (folder / f"{i:05d}.txt").write_text(f"img{i % 17}, tag{i % 5}, tag{i % 7}", encoding="utf-8")


def timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_loading(folder: Path, resolution: int, step: int, batch_size: int, workers: list[int]) -> dict:
    """images/s of scanning (full decode check), bucketing (+ preload), and batch loading."""
    scan, t_scan = timed(lambda: scan_folder(folder))
    n = len(scan.items)
    config = [DatasetConfig(folder_path=str(folder), resolution=resolution, flip_x=True)]
    out: dict[str, Any] = {
        "images": n,
        "resolution": resolution,
        "bucket_step": step,
        "scan_images_per_s": n / t_scan,
    }
    data, t_build = timed(lambda: TrainingData(config, batch_size, 0, step))
    out["buckets"] = len({(v.width, v.height) for v in data.views})
    out["bucket_and_preload_images_per_s"] = n / t_build
    out["preloaded"] = bool(data._preloaded)
    batches = data.batches_per_epoch

    def epoch(d: TrainingData, num_workers: int) -> float:
        seen = 0
        start = time.perf_counter()
        for batch in d.iterate(0, batches, num_workers):
            seen += len(batch)
        return seen / (time.perf_counter() - start)

    out["load_in_memory_images_per_s"] = epoch(data, 0) if data._preloaded else None
    saved = loader_module.PRELOAD_BYTES
    loader_module.PRELOAD_BYTES = 0  # decode every batch from disk, as for datasets larger than memory
    try:
        lazy = TrainingData(config, batch_size, 0, step)
        for w in workers:
            out[f"load_from_disk_workers{w}_images_per_s"] = epoch(lazy, w)
    finally:
        loader_module.PRELOAD_BYTES = saved
    return out


def bench_training(root: Path, folder: Path, steps: int, batch_size: int, rounds: int) -> dict:
    """Tiny-family training (text encoder frozen) without caches and with latent + text caches.

    Images/s come from the loop's own steps/s (set-up excluded). Uncached and cached runs alternate for
    ``rounds`` rounds and the medians are reported, so load from other processes on a shared machine hits
    both alike; the first cached run, which builds the cache, is timed separately.
    """

    def run(name: str, cached: bool, n_steps: int = steps) -> tuple[float, float]:
        job = JobConfig.model_validate(
            {
                "name": name,
                "output_dir": str(root / "runs"),
                "model": {"arch": "tiny", "options": TINY},
                "train": {"steps": n_steps, "batch_size": batch_size, "train_text_encoder": False, "seed": 0},
                "save": {"every": n_steps},
                "logging": {"progress": False, "tensorboard": False, "log_every": n_steps},
                "datasets": [
                    {
                        "folder_path": str(folder),
                        "resolution": 32,
                        "caption_dropout_rate": 0.1,
                        "cache_latents_to_disk": cached,
                        "cache_text_embeddings": cached,
                    }
                ],
            }
        )
        _, wall = timed(lambda: train(job))
        metrics = (root / "runs" / name / "metrics.jsonl").read_text().splitlines()
        return json.loads(metrics[-1])["steps_per_s"] * batch_size, wall

    run("warm_up", False, 3)  # first-call costs (allocator, kernels, imports) land here, not in the figures
    _, build_wall = run("cache_build", True, 1)
    _, reuse_wall = run("cache_reuse", True, 1)
    plain, cached = [], []
    for r in range(rounds):
        plain.append(run(f"uncached_{r}", False)[0])
        cached.append(run(f"cached_{r}", True)[0])
    return {
        "steps": steps,
        "batch_size": batch_size,
        "rounds": rounds,
        "uncached_images_per_s": statistics.median(plain),
        "cached_images_per_s": statistics.median(cached),
        "cached_speedup": statistics.median(cached) / statistics.median(plain),
        "all_uncached_images_per_s": plain,
        "all_cached_images_per_s": cached,
        "one_step_run_wall_s": {"building_the_cache": build_wall, "reusing_the_cache": reuse_wall},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="small mixed-size images (24-96 px)")
    parser.add_argument("--photos", type=int, default=64, help="photo-sized images (384-1024 px)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating uncached/cached rounds")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.ERROR)
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_images(root / "small", args.images, 24, 96, seed=0)
        write_images(root / "photos", args.photos, 384, 1024, seed=1)
        result = {
            "benchmark": "data",
            "device": f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads",
            "python": sys.version.split()[0],
            "loading_small": bench_loading(root / "small", 32, 8, args.batch_size, args.workers),
            "loading_photos": bench_loading(root / "photos", 512, 64, 4, args.workers),
            "training_tiny": bench_training(root, root / "small", args.steps, args.batch_size, args.rounds),
        }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
