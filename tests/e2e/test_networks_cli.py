"""LoRA training, generation with --lora, eval, merge and convert through the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from eridiffusion.cli import main
from tests.conftest import tiny_job, write_yaml


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A base model trained for 2 steps, then a LoRA on it trained for 3 steps (module-scoped: reused)."""
    root = tmp_path_factory.mktemp("lora")
    assert (
        main(["train", str(write_yaml(root / "base.yaml", tiny_job(root, name="base"))), "train.steps=2"])
        == 0
    )
    job = tiny_job(root, name="concept")
    job["model"] = {"name_or_path": str(root / "output" / "base" / "model")}
    job["network"] = {"type": "lora", "linear": 4, "linear_alpha": 2, "conv": 2}
    job["train"]["steps"] = 3
    job["train"]["lr"] = 1e-2
    job["sample"] = {"prompts": ["a red circle"], "steps": 2, "images_per_prompt": 1}
    cfg = write_yaml(root / "concept.yaml", job)
    assert main(["train", str(cfg)]) == 0
    return root, cfg


def test_lora_run_writes_a_kohya_file_per_checkpoint_and_at_the_end(lora_run: tuple[Path, Path]) -> None:
    root, _ = lora_run
    run = root / "output" / "concept"
    final = load_file(run / "concept.safetensors")
    assert final and all(k.startswith(("lora_unet_", "lora_te_")) for k in final)
    assert any(k.endswith(".alpha") for k in final)
    assert (run / "checkpoints" / "step_000002" / "concept.safetensors").is_file()
    assert not (run / "model").exists()
    assert (run / "samples" / "step_000003.png").is_file()
    # only the adapter was trained: the checkpoint holds adapter tensors alone
    trainable = load_file(run / "checkpoints" / "step_000003" / "trainable.safetensors")
    assert trainable and all(("lora_" in k) for k in trainable)


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_generate_with_lora_merge_and_convert(
    lora_run: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    root, cfg = lora_run
    base = root / "output" / "base" / "model"
    lora = root / "output" / "concept" / "concept.safetensors"
    common = ["--prompt", "a red circle", "--steps", "3", "--seed", "1"]

    assert main(["generate", "--model", str(base), *common, "--out", str(root / "plain")]) == 0
    assert (
        main(["generate", "--model", str(base), "--lora", f"{lora}:1.0", *common, "--out", str(root / "l")])
        == 0
    )
    with_lora = _pixels(root / "l" / "0000-1.png")
    assert np.abs(with_lora - _pixels(root / "plain" / "0000-1.png")).max() > 0

    assert main(["merge", "--model", str(base), "--lora", str(lora), "--out", str(root / "merged")]) == 0
    assert main(["generate", "--model", str(root / "merged"), *common, "--out", str(root / "m")]) == 0
    assert np.abs(with_lora - _pixels(root / "m" / "0000-1.png")).max() <= 1

    converted = root / "d.safetensors"
    assert main(["convert", str(lora), str(converted), "--model", str(base), "--to", "diffusers"]) == 0
    assert all(k.startswith(("unet.", "text_encoder.")) for k in load_file(converted))
    assert (
        main(["generate", "--model", str(base), "--lora", str(converted), *common, "--out", str(root / "c")])
        == 0
    )
    assert np.abs(with_lora - _pixels(root / "c" / "0000-1.png")).max() <= 1

    assert main(["eval", str(cfg), "--json"]) == 0
    assert "concept.safetensors" in (root / "output" / "concept" / "eval.json").read_text()
    capsys.readouterr()


def test_init_from_continues_training_and_bad_file_is_clear(
    lora_run: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    root, _ = lora_run
    job = tiny_job(root, name="more")
    job["model"] = {"name_or_path": str(root / "output" / "base" / "model")}
    lora = root / "output" / "concept" / "concept.safetensors"
    job["network"] = {"type": "lora", "linear": 4, "linear_alpha": 2, "conv": 2, "init_from": str(lora)}
    assert main(["train", str(write_yaml(root / "more.yaml", job)), "train.steps=1"]) == 0
    job["network"]["linear"] = 8
    assert main(["train", str(write_yaml(root / "bad.yaml", job)), "name=bad", "train.steps=1"]) == 2
    assert "network.init_from" in capsys.readouterr().err
