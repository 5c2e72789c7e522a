"""Prior and output preservation on every family: the class images are drawn with the family's own
default sampler at its size, and the output-preservation term is zero at the start, positive once the
adapter moves, and has gradients for the adapter (SDXL's size conditioning reaches both passes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eridiffusion.config.schema import JobConfig
from eridiffusion.data.loader import TrainingData
from eridiffusion.data.shapes import write_shapes_dataset
from eridiffusion.training.class_images import fill_class_images
from eridiffusion.training.engine import Engine
from eridiffusion.training.preservation import OutputPreservation
from eridiffusion.training.stages import single_stage_plan, trainable_parameters
from eridiffusion.training.step import diffusion_loss
from tests.families.test_contract import FAMILIES

CPU = torch.device("cpu")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_preservation_on_every_family(name: str, tmp_path: Path) -> None:
    family = FAMILIES[name]()
    size = family.default_resolution()
    write_shapes_dataset(tmp_path / "concept", n=4, resolution=size, seed=0)
    cfg = JobConfig.model_validate(
        {
            "name": "p",
            "network": {"type": "lora", "linear": 4, "linear_alpha": 4},
            "train": {
                "diff_output_preservation": True,
                "diff_output_preservation_class": "shape",
                "train_text_encoder": False,
            },
            "sample": {"steps": 2, "images_per_prompt": 2},
            "datasets": [
                {"folder_path": str(tmp_path / "concept"), "resolution": size, "trigger_word": "sks"},
                {
                    "folder_path": str(tmp_path / "class"),
                    "is_reg": True,
                    "class_prompt": "a shape",
                    "num_class_images": 2,
                    "resolution": size,
                },
            ],
        }
    )
    params = trainable_parameters(family, cfg)
    assert fill_class_images(cfg, family, cfg.datasets, Engine(CPU, None), "datasets") == 2
    drawn = sorted((tmp_path / "class").glob("class_*.png"))
    assert len(drawn) == 2 and (tmp_path / "class" / "class_00001.txt").read_text() == "a shape\n"

    dop = OutputPreservation.for_stage(cfg, single_stage_plan(cfg, family).config, cfg.datasets, family)
    assert dop is not None and not dop.text_adapted
    batch = TrainingData(cfg.datasets[:1], 2, 0, family.size_multiple()).batch(0)
    metrics: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        diffusion_loss(family, batch, cfg, torch.Generator().manual_seed(0), CPU, dop, metrics)
    assert metrics["preservation_loss"].item() == 0.0
    with torch.no_grad():
        for key, p in params.items():
            if "lora_B" in key:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    loss = diffusion_loss(family, batch, cfg, torch.Generator().manual_seed(0), CPU, dop, metrics)
    assert metrics["preservation_loss"].item() > 0
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values())
