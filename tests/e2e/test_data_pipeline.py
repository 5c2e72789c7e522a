"""`eri train` on a folder of mixed-size images with buckets, latent + text caches, workers and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eridiffusion.cli import main
from eridiffusion.training import loop
from tests.conftest import tiny_job, write_yaml
from tests.unit.imagesets import write_mixed_folder


def _job(root: Path, name: str, photos: Path) -> dict:
    job = tiny_job(root, name=name)
    job["train"].update({"steps": 8, "batch_size": 3, "train_text_encoder": False})
    job["save"] = {"every": 2, "keep": 5}
    job["sample"] = {"prompts": ["ohwx, red"], "steps": 2, "images_per_prompt": 1}
    job["datasets"] = [
        {
            "folder_path": str(photos),
            "resolution": 16,
            "trigger_word": "ohwx",
            "flip_x": True,
            "caption_dropout_rate": 0.2,
            "cache_latents_to_disk": True,
            "cache_text_embeddings": True,
        }
    ]
    return job


def test_bucketed_cached_training_resumes_bit_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, caplog
) -> None:
    photos = tmp_path / "photos"
    write_mixed_folder(photos)
    whole = write_yaml(tmp_path / "whole.yaml", _job(tmp_path, "whole", photos))
    with caplog.at_level("INFO"):
        assert main(["train", str(whole)]) == 0
    log = caplog.text
    assert "2 unreadable image(s) skipped; training on 14" in log
    assert "20x12 (5:3):" in log and "12x20 (3:5):" in log  # the printed bucket report
    assert "latent cache: 28 computed, 0 reused" in log  # 14 images x (plain, flipped)
    assert "text cache: 15 computed, 0 reused" in log  # 14 captions + the empty prompt
    assert (tmp_path / "output" / "whole" / "samples" / "step_000008.png").is_file()

    crash = write_yaml(tmp_path / "crash.yaml", _job(tmp_path, "crash", photos))

    def die_at_4(state: loop.TrainState) -> None:
        if state.step == 4:
            raise KeyboardInterrupt

    real_train = loop.train
    monkeypatch.setattr(loop, "train", lambda cfg: real_train(cfg, on_step=die_at_4))
    caplog.clear()
    with caplog.at_level("INFO"), pytest.raises(KeyboardInterrupt):
        main(["train", str(crash)])
    assert "latent cache: 0 computed, 28 reused" in caplog.text  # the first run's cache, reused
    monkeypatch.setattr(loop, "train", real_train)
    # resume with two loader workers: the batch sequence does not depend on the worker count
    assert main(["train", str(crash), "train.num_workers=2"]) == 0

    runs = [tmp_path / "output" / name / "checkpoints" / "step_000008" for name in ("whole", "crash")]
    for file in ("trainable.safetensors", "ema.safetensors"):
        a, b = load_file(runs[0] / file), load_file(runs[1] / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [
        [
            json.loads(line)["loss"]
            for line in (tmp_path / "output" / n / "metrics.jsonl").read_text().splitlines()
        ]
        for n in ("whole", "crash")
    ]
    assert len(losses[0]) == 8 and losses[0] == losses[1]
    assert (
        json.loads((runs[0] / "state.json").read_text())["epoch"] == 1
    )  # 6 batches per epoch: killed mid-epoch 0, ends in epoch 1


def test_empty_bucket_setting_is_a_clear_cli_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    small = tmp_path / "small"
    small.mkdir()
    Image.new("RGB", (3, 3)).save(small / "a.png")
    job = tiny_job(tmp_path)
    job["datasets"] = [{"folder_path": str(small), "resolution": 16, "bucket_no_upscale": True}]
    job["train"]["batch_size"] = 1  # a larger batch is refused earlier, by the pre-flight check
    assert main(["train", str(write_yaml(tmp_path / "job.yaml", job))]) == 2
    err = capsys.readouterr().err
    assert "datasets[0]" in err and "no usable image" in err and "bucket_no_upscale: false" in err
