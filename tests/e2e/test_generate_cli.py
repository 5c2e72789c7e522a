"""`eri generate` img2img / inpaint through the CLI on a saved tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eridiffusion.cli import EXIT_USER_ERROR, main
from eridiffusion.models import build_family
from tests.conftest import TINY_OPTIONS


def test_generate_img2img_and_inpaint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = tmp_path / "model"
    build_family("tiny", TINY_OPTIONS, seed=0).save_pretrained(model)
    rng = np.random.default_rng(0)
    start = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(start).save(tmp_path / "start.png")
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[8:] = 255  # repaint the bottom half
    Image.fromarray(mask).save(tmp_path / "mask.png")
    common = ["generate", "--model", str(model), "--prompt", "a red circle", "--steps", "3", "--seed", "4"]
    start_args = ["--init-image", str(tmp_path / "start.png")]
    assert (
        main([*common, *start_args, "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "o")]) == 0
    )
    out = Image.open(tmp_path / "o" / "0000-4.png")
    assert out.size == (16, 16) and out.info["parameters"].startswith("a red circle\nSteps: 3")
    pixels = np.asarray(out)
    assert np.array_equal(pixels[:8], start[:8]) and not np.array_equal(pixels[8:], start[8:])
    assert main([*common, *start_args, "--strength", "0.5", "--out", str(tmp_path / "i")]) == 0
    assert (tmp_path / "i" / "0000-4.png").is_file()
    capsys.readouterr()
    assert (
        main([*common, "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "x")]) == EXIT_USER_ERROR
    )
    assert "--mask needs --init-image" in capsys.readouterr().err


def test_generate_memory_flags_give_the_same_image(tmp_path: Path) -> None:
    model = tmp_path / "model"
    build_family("sd15", {"preset": "tiny"}, seed=0).save_pretrained(model)
    common = ["generate", "--model", str(model), "--prompt", "a red circle", "--steps", "2", "--n", "2"]
    assert main([*common, "--device", "cpu", "--out", str(tmp_path / "plain")]) == 0
    memory = ["--attention-slicing", "auto", "--vae-slicing", "--cpu-offload", "--no-vae-upcast"]
    assert main([*common, "--device", "cpu", *memory, "--out", str(tmp_path / "low")]) == 0
    for name in ("0000-0.png", "0001-1.png"):
        plain = np.asarray(Image.open(tmp_path / "plain" / name)).astype(int)
        low = np.asarray(Image.open(tmp_path / "low" / name)).astype(int)
        assert np.abs(plain - low).max() <= 1
    assert main([*common, "--attention-slicing", "half", "--out", str(tmp_path / "x")]) == EXIT_USER_ERROR
