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
