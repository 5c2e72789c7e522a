"""``eri plan`` on a real-size preset: the trace runs in seconds on a CPU, its weights are the model's bytes,
the verdict follows ``--gpu-gb`` (exit 1 when the step does not fit), and bad input exits 2 with a message."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from eridiffusion.cli import main
from eridiffusion.models import build_family


def write_job(tmp_path: Path, **extra: Any) -> Path:
    job = {
        "name": "plan",
        "model": {"arch": "sdxl", "options": {"preset": "full"}, "dtype": "bf16"},
        "network": {"type": "lora", "linear": 16, "target": "attention"},
        "train": {"batch_size": 1, "gradient_checkpointing": True, "train_text_encoder": False},
        "datasets": [
            {
                "folder_path": str(tmp_path / "images"),
                "resolution": 512,
                "cache_latents_to_disk": True,
                "cache_text_embeddings": True,
            }
        ],
        **extra,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    return path


def test_plan_real_size_sdxl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_job(tmp_path)
    assert main(["plan", str(config), "--gpu-gb", "4", "--json"]) == 1  # exit 1: does not fit
    out = json.loads(capsys.readouterr().out)
    with torch.device("meta"):
        unet = build_family("sdxl", {"preset": "full"}).modules()["denoiser"]
    unet_bytes = sum(p.numel() * 2 for p in unet.parameters())  # bf16 frozen weights
    assert abs(out["weights"] - unet_bytes) / unet_bytes < 0.001  # the UNet alone: encoders are cached
    assert out["fits"] is False and out["required_gib"] > 4 and out["gpu_gb"] == 4
    assert out["resolution"] == 512 and out["precision"] == "bfloat16"
    assert 0 < out["activations"] < out["weights"] and out["trainable"] > 0 and out["optimizer_state"] > 0
    parts = ("weights", "trainable", "grads", "optimizer_state", "caches", "activations")
    assert sum(out[k] for k in parts) == out["peak"]


def test_plan_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loaded = write_job(tmp_path, model={"name_or_path": str(tmp_path / "model.safetensors")})
    assert main(["plan", str(loaded)]) == 2
    assert "is not here to tell its family; set model.arch" in capsys.readouterr().err
    assert main(["plan", str(write_job(tmp_path)), "--resolution", "500"]) == 2
    assert "height 500 must be a positive multiple of" in capsys.readouterr().err
    assert main(["plan", str(write_job(tmp_path)), "--blocks-to-swap", "4"]) == 2
    assert "has no list of repeated transformer blocks" in capsys.readouterr().err
