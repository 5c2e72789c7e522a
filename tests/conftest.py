"""Shared fixtures: a very small tiny-family job that trains in seconds on a CPU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# one intra-op thread: the tiny test models gain nothing from two, and on the shared 2-core machine two
# OpenMP threads spin against other processes (measured: a tiny Flux train step 0.06 s -> 6 s under load)
torch.set_num_threads(1)

TINY_OPTIONS: dict[str, Any] = {
    "resolution": 16,
    "patch_size": 2,
    "channels": [16, 32],
    "attention_levels": [False, True],
    "norm_num_groups": 8,
    "context_dim": 32,
    "text_layers": 1,
    "text_heads": 2,
    "max_tokens": 12,
}


def tiny_job(root: Path, **sections: Any) -> dict[str, Any]:
    """A job dict for a 16 px model on 48 synthetic images; ``sections`` replace whole top-level keys."""
    job: dict[str, Any] = {
        "name": "t",
        "output_dir": str(root / "output"),
        "model": {"arch": "tiny", "options": dict(TINY_OPTIONS)},
        "train": {
            "steps": 4,
            "batch_size": 8,
            "lr": 1e-3,
            "lr_warmup_steps": 1,
            "seed": 3,
            "ema": {"enabled": True, "decay": 0.99},
        },
        "save": {"every": 2, "keep": 2},
        "sample": {"prompts": [], "steps": 2, "images_per_prompt": 1},
        "logging": {"progress": False, "tensorboard": True, "log_every": 1},
        "eval": {"images_per_prompt": 1, "steps": 2},
        "datasets": [
            {
                "folder_path": str(root / "shapes"),
                "resolution": 16,
                "caption_dropout_rate": 0.1,
                "synthetic": {"kind": "shapes", "n": 48, "resolution": 16, "seed": 0},
            }
        ],
    }
    job.update(sections)
    return job


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def job_yaml(tmp_path: Path) -> Path:
    return write_yaml(tmp_path / "job.yaml", tiny_job(tmp_path))
