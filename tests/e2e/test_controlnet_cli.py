"""`eri generate --controlnet` on a saved tiny SD1.5 model, and its errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eridiffusion.cli import EXIT_USER_ERROR, main
from eridiffusion.models import build_family
from tests.conftest import TINY_OPTIONS
from tests.families.test_controlnet import random_controlnet, tiny_sd


def test_generate_with_controlnet(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    family = tiny_sd("sd15")
    family.save_pretrained(tmp_path / "model")
    random_controlnet(family).save_pretrained(tmp_path / "cn")
    build_family("tiny", TINY_OPTIONS, seed=0).save_pretrained(tmp_path / "tiny")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(tmp_path / "hint.png")
    common = ["generate", "--model", str(tmp_path / "model"), "--prompt", "a red circle", "--steps", "3"]
    control = ["--controlnet", str(tmp_path / "cn"), "--control-image", str(tmp_path / "hint.png")]

    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    # the 48 px control image is resized to the model's default 32 px output
    assert (
        main(
            [
                *common,
                *control,
                "--control-scale",
                "0.9",
                "--control-end",
                "0.8",
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )
    out = Image.open(tmp_path / "c" / "0000-0.png")
    assert out.size == (32, 32)
    assert (
        'ControlNet 0: "Module: none, Model: cn, Weight: 0.9, Guidance Start: 0, Guidance End: 0.8"'
        in (out.info["parameters"])
    )
    plain = np.asarray(Image.open(tmp_path / "plain" / "0000-0.png")).astype(int)
    assert np.abs(np.asarray(out).astype(int) - plain).max() > 2

    capsys.readouterr()
    cases = [
        ([*common, "--controlnet", str(tmp_path / "cn")], "--controlnet and --control-image go together"),
        ([*common, *control[:1], str(tmp_path / "missing"), *control[2:]], "does not exist"),
        ([*common, *control, "--control-start", "0.9", "--control-end", "0.1"], "0 <= start <= end <= 1"),
        (
            ["generate", "--model", str(tmp_path / "tiny"), "--prompt", "x", "--steps", "2", *control],
            "tiny has no ControlNet support",
        ),
    ]
    for args, message in cases:
        assert main([*args, "--out", str(tmp_path / "x")]) == EXIT_USER_ERROR
        assert message in capsys.readouterr().err
