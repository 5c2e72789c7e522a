"""The 24 GB recipes in configs/ run as written on the tiny preset of their family (only paths, size and
length overridden): quantised base, caches, checkpointing, 8-bit AdamW and sampling all take part."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open

from eridiffusion.cli import main
from eridiffusion.data.shapes import write_shapes_dataset
from eridiffusion.models import build_family

CONFIGS = Path(__file__).parents[2] / "configs"
RECIPES = {
    "flux_lora_24gb.yaml": ("flux", "fp8"),
    "sd35_lora_24gb.yaml": ("sd3", "int8"),
    "sdxl_lora_24gb.yaml": ("sdxl", None),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_trains_on_the_tiny_preset(
    tmp_path: Path, recipe: str, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("bitsandbytes")  # the recipes use 8-bit AdamW
    arch, quantized = RECIPES[recipe]
    build_family(arch, {"preset": "tiny"}, seed=0).save_pretrained(tmp_path / "base")
    write_shapes_dataset(tmp_path / "data", n=8, resolution=64, seed=0)
    overrides = [
        f"model.name_or_path={tmp_path / 'base'}",
        f"datasets.0.folder_path={tmp_path / 'data'}",
        "datasets.0.resolution=64",
        f"output_dir={tmp_path / 'out'}",
        "train.steps=2",
        "train.device=cpu",
        "train.mixed_precision=no",
        "save.every=2",
        "sample.steps=2",
        "logging.progress=false",
    ]
    with caplog.at_level("INFO"):
        assert main(["train", str(CONFIGS / recipe), *overrides]) == 0
    name = recipe.removesuffix(".yaml")
    with safe_open(tmp_path / "out" / name / f"{name}.safetensors", "pt") as f:
        assert any("lora" in k for k in f.keys())  # noqa: SIM118 (safe_open, not a dict)
    if quantized:
        assert f"layers quantised to {quantized}" in caplog.text
    assert "latent cache: 8 computed" in caplog.text or "latent cache" in caplog.text
    assert (tmp_path / "out" / name / "samples" / "step_000002.png").is_file()
