"""`eri validate` / `eri train` with loss masks on the tiny model: the plan counts the masks, cached and
uncached runs give the same weights, the masks change what is learned, and broken masks stop the run with
a message naming the file or key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from eridiffusion.cli import EXIT_USER_ERROR, main
from eridiffusion.training import loop
from tests.conftest import tiny_job, write_yaml


def _photos(folder: Path) -> None:
    """Six 16 px images with captions; four have a mask beside them (top half white)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    top = np.zeros((16, 16), np.uint8)
    top[:8] = 255
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(f"a photo, number {i}")
        if i < 4:
            Image.fromarray(top).save(folder / f"p{i}_mask.png")


def _job(root: Path, name: str, photos: Path, **dataset: object) -> Path:
    job = tiny_job(root, name=name)
    job["train"].update(steps=3, batch_size=3, train_text_encoder=False)
    job["save"] = {"every": 3, "keep": 1}
    job["datasets"] = [{"folder_path": str(photos), "resolution": 16, "flip_x": True, **dataset}]
    return write_yaml(root / f"{name}.yaml", job)


def _weights(root: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(root / "output" / name / "checkpoints" / "step_000003" / "trainable.safetensors")


def test_masked_training_cached_equals_uncached_and_masks_matter(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog
) -> None:
    photos = tmp_path / "photos"
    _photos(photos)
    plain = _job(tmp_path, "plain", photos, unmasked_weight=0.1)
    assert main(["validate", str(plain)]) == 0
    out = capsys.readouterr().out
    assert "datasets[0]: loss masks on 4 of 6 images" in out
    assert "data: 6 images per epoch" in out  # the masks are not counted as images

    with caplog.at_level("INFO"):
        assert main(["train", str(plain)]) == 0
    assert "loss masks: 4 of 6 images" in caplog.text
    assert (
        main(
            ["train", str(_job(tmp_path, "cached", photos, unmasked_weight=0.1, cache_latents_to_disk=True))]
        )
        == 0
    )
    a, b = _weights(tmp_path, "plain"), _weights(tmp_path, "cached")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert main(["train", str(_job(tmp_path, "white", photos, unmasked_weight=1.0))]) == 0
    white = _weights(tmp_path, "white")  # unmasked_weight 1: every mask is all ones, as without masks
    assert any(not torch.equal(a[k], white[k]) for k in a)


def test_mask_folder_and_broken_masks_are_clear_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = tmp_path / "photos"
    _photos(photos)
    missing = _job(tmp_path, "missing", photos, mask_path=str(tmp_path / "nowhere"))
    assert main(["validate", str(missing)]) == EXIT_USER_ERROR
    assert "datasets[0].mask_path: '" in capsys.readouterr().err

    (photos / "p2_mask.png").write_bytes(b"not a png at all")
    monkeypatch.setattr(loop, "load_or_build", lambda cfg: pytest.fail("the model loaded before the check"))
    assert main(["train", str(_job(tmp_path, "broken", photos))]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "cannot read loss mask" in err and "p2_mask.png" in err and "Traceback" not in err
