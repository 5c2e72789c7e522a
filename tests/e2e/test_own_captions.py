"""A from-scratch tiny model trained on a user's own captions: the tokenizer learns their words, keeps them
through resume / generate, and no caption or prompt is cut without a message.

The data is generated here with its own vocabulary (patterns named with long words the built-in tokenizer
spells byte by byte), and every caption differs from the others only after its 16th built-in token.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from eridiffusion.cli import main
from eridiffusion.config.schema import JobConfig
from eridiffusion.inference.generate import GenerateRequest, sample, to_pil
from eridiffusion.models import load_family
from eridiffusion.models.tiny import TinyFamily
from eridiffusion.models.tokenizer import MIN_TOKENS, build_tokenizer
from eridiffusion.training.loop import train
from tests.conftest import tiny_job, write_yaml

PATTERNS = {"horizontally striped": "rows", "vertically striped": "columns", "checkerboard": "checks"}
COLOURS = {"crimson": (200, 30, 30), "navy": (30, 40, 200)}
COMBOS = list(itertools.product(PATTERNS, COLOURS))
BACKGROUND = 235


def caption(pattern: str, colour: str) -> str:
    return f"a watercolor painting of {colour} {pattern} fabric"


def render(pattern: str, colour: str, side: int = 16) -> Image.Image:
    """2 px bands (or squares) of the colour on a light background."""
    y, x = np.mgrid[0:side, 0:side] // 2
    on = {"rows": y % 2 == 0, "columns": x % 2 == 0, "checks": (x + y) % 2 == 0}[PATTERNS[pattern]]
    pixels = np.full((side, side, 3), BACKGROUND, np.uint8)
    pixels[on] = COLOURS[colour]
    return Image.fromarray(pixels)


def classify(image: Image.Image) -> tuple[str, str]:
    """(pattern, colour) from pixel statistics: bands change along one axis only, checks along both; the
    colour is the one nearest the mean of the dark pixels."""
    rgb = np.asarray(image.convert("RGB")).astype(float)
    grey = rgb.mean(axis=2)
    across_rows = np.abs(np.diff(grey, axis=0)).mean()
    across_columns = np.abs(np.diff(grey, axis=1)).mean()
    if across_rows > 2 * across_columns:
        kind = "rows"
    elif across_columns > 2 * across_rows:
        kind = "columns"
    else:
        kind = "checks"
    pattern = next(p for p, k in PATTERNS.items() if k == kind)
    dark = rgb[grey < (BACKGROUND + grey.min()) / 2]
    mean = dark.mean(axis=0) if len(dark) else np.full(3, BACKGROUND)
    colour = min(COLOURS, key=lambda c: float(np.square(mean - np.array(COLOURS[c])).sum()))
    return pattern, colour


def write_patterns(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pattern, colour = COMBOS[i % len(COMBOS)]
        render(pattern, colour).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption(pattern, colour), encoding="utf-8")


def patterns_job(root: Path, **train: Any) -> dict[str, Any]:
    job = tiny_job(root)
    write_patterns(root / "patterns", 48)
    job["datasets"] = [{"folder_path": str(root / "patterns"), "resolution": 16, "caption_dropout_rate": 0.1}]
    job["model"]["options"].pop("max_tokens")  # chosen from the captions
    job["train"].update(train)
    return job


def test_classifier_reads_the_rendered_patterns() -> None:
    for pattern, colour in COMBOS:
        assert classify(render(pattern, colour)) == (pattern, colour)


def test_captions_differ_only_past_the_builtin_16_tokens(tmp_path: Path) -> None:
    """The premise: with the built-in vocabulary every caption of this data reads the same."""
    builtin = build_tokenizer(tmp_path / "tok")
    ids = builtin([caption(p, c) for p, c in COMBOS], truncation=True, max_length=MIN_TOKENS).input_ids
    assert all(row == ids[0] for row in ids)


def test_scratch_model_learns_caption_words_and_keeps_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    job = patterns_job(tmp_path, steps=2)
    job["save"] = {"every": 1, "keep": 3}
    path = write_yaml(tmp_path / "job.yaml", job)
    assert main(["train", str(path)]) == 0
    model = load_family(tmp_path / "output" / "t" / "model")
    assert isinstance(model, TinyFamily)
    for pattern, colour in COMBOS:
        pieces = model.tokenizer.tokenize(caption(pattern, colour))
        assert len(pieces) == len(caption(pattern, colour).split())  # one token per word
    meta = json.loads((tmp_path / "output" / "t" / "model" / "eri_family.json").read_text())
    assert meta["options"]["max_tokens"] == MIN_TOKENS  # 11 tokens: the built-in 16 holds them
    saved = model.tokenizer([caption(*COMBOS[0])]).input_ids

    # resume rebuilds the same tokenizer from the same captions (the checkpoint's embedding fits it)
    assert main(["train", str(path), "train.steps=3"]) == 0
    resumed = load_family(tmp_path / "output" / "t" / "model")
    assert isinstance(resumed, TinyFamily)
    assert resumed.tokenizer([caption(*COMBOS[0])]).input_ids == saved

    caplog.clear()
    long_prompt = " ".join([caption(*COMBOS[0])] * 3)
    args = ["generate", "--model", str(tmp_path / "output" / "t" / "model"), "--steps", "2"]
    with caplog.at_level(logging.WARNING):
        assert main([*args, "--prompt", caption(*COMBOS[0]), "--out", str(tmp_path / "g1")]) == 0
        assert "prompts cut" not in caplog.text
        assert main([*args, "--prompt", long_prompt, "--out", str(tmp_path / "g2")]) == 0
    assert f"1 of 1 prompts are longer than the {MIN_TOKENS} tokens of tokenizer" in caplog.text
    assert repr(long_prompt) in caplog.text


def test_long_captions_are_reported_in_training_and_validate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    job = patterns_job(tmp_path, steps=1)
    job["model"]["options"]["max_tokens"] = 8  # the captions have 9 words + start/end
    path = write_yaml(tmp_path / "job.yaml", job)
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "warning: 6 of 6 distinct captions are longer than the 8 tokens of tokenizer" in out
    with caplog.at_level(logging.WARNING):
        train(JobConfig.model_validate(job))
    warnings = [r.getMessage() for r in caplog.records if "distinct captions are longer" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "6 of 6 distinct captions are longer than the 8 tokens of tokenizer" in warnings[0]
    assert "has 10 tokens" in warnings[0]  # the example's count


@pytest.mark.slow
def test_scratch_model_follows_its_own_vocabulary(tmp_path: Path) -> None:
    """Adherence: 6 pattern x colour prompts, 4 images each, scored by the pixel classifier (measured:
    1.0 for pattern and colour after 400 steps; with the built-in tokenizer the prompts are identical)."""
    job = patterns_job(tmp_path, steps=400, batch_size=16, lr=3e-3, lr_warmup_steps=20)
    write_patterns(tmp_path / "patterns", 96)
    job["model"]["options"].update(beta_schedule="cosine", prediction_type="v_prediction")
    job["save"] = {"every": 1000, "keep": 1}
    job["logging"]["tensorboard"] = False
    result = train(JobConfig.model_validate(job))
    family = load_family(result.output)
    request = GenerateRequest(
        prompts=[caption(p, c) for p, c in COMBOS], steps=20, guidance_scale=3.0, seed=0, images_per_prompt=4
    )
    with torch.no_grad():
        images = to_pil(sample(family, request, torch.device("cpu")))
    wanted = [combo for combo in COMBOS for _ in range(4)]
    got = [classify(image) for image in images]
    pattern_ok = np.mean([g[0] == w[0] for g, w in zip(got, wanted, strict=True)])
    colour_ok = np.mean([g[1] == w[1] for g, w in zip(got, wanted, strict=True)])
    assert pattern_ok >= 0.8 and colour_ok >= 0.8, (pattern_ok, colour_ok)
