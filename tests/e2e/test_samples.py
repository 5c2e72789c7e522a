"""Sample grids during training, as peers configure them: per-prompt size/seed/steps/guidance/negative
(mappings or kohya's prompt flags), [trigger] substituted, walk_seed, and the family's own sampler by
default (Flow Euler for flow models, which DDIM used to fail on)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from eridiffusion.cli import EXIT_USER_ERROR, main
from eridiffusion.data.shapes import write_shapes_dataset
from eridiffusion.models import build_family
from eridiffusion.training import samples
from tests.conftest import tiny_job, write_yaml


def _record(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    seen: list[Any] = []
    real = samples.sample

    def spy(family, req, device):  # noqa: ANN001, ANN202
        seen.append(req)
        return real(family, req, device)

    monkeypatch.setattr(samples, "sample", spy)
    return seen


def test_per_prompt_settings_flags_trigger_and_walk_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _record(monkeypatch)
    job = tiny_job(tmp_path)
    job["datasets"][0]["trigger_word"] = "zxq"
    job["train"]["steps"] = 2
    job["sample"] = {
        "prompts": [
            {"prompt": "[trigger] a red circle", "width": 16, "height": 32, "seed": 5, "neg": "blue"},
            "a blue square --w 32 --h 16 --s 3 --l 2.5 --n red, green",
            "a green triangle",
        ],
        "steps": 2,
        "images_per_prompt": 2,
        "seed": 100,
        "walk_seed": True,
    }
    assert main(["train", str(write_yaml(tmp_path / "job.yaml", job))]) == 0
    a, b, c = seen[-3:]  # the final grid's three rows
    assert (a.prompts, a.width, a.height, a.seed, a.negative_prompt) == (
        ["zxq a red circle"],
        16,
        32,
        5,
        "blue",
    )
    assert (b.width, b.height, b.steps, b.guidance_scale, b.negative_prompt) == (32, 16, 3, 2.5, "red, green")
    assert (b.seed, c.seed) == (102, 104)  # walk_seed: row i starts at seed + i x images_per_prompt
    assert (c.width, c.height, c.steps) == (None, None, 2) and a.sampler == "ddim"
    grid = Image.open(tmp_path / "output" / "t" / "samples" / "step_000002.png")
    assert grid.size[1] == 3 * grid.size[0] // 2  # 3 rows of 2 images, each in the largest cell


def test_a_flow_model_samples_with_its_own_sampler_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _record(monkeypatch)
    build_family("sd3", {"preset": "tiny"}, seed=0).save_pretrained(tmp_path / "base")
    write_shapes_dataset(tmp_path / "shapes", n=8, resolution=32, seed=0)
    job = tiny_job(tmp_path)
    job["model"] = {"name_or_path": str(tmp_path / "base")}
    job["datasets"] = [{"folder_path": str(tmp_path / "shapes"), "resolution": 32}]
    job["train"].update(steps=1, batch_size=4)
    job["sample"] = {"prompts": ["a red circle"], "steps": 2, "images_per_prompt": 1}
    assert main(["train", str(write_yaml(tmp_path / "job.yaml", job))]) == 0
    assert seen and seen[-1].sampler == "flow_euler"


def test_an_unknown_prompt_flag_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job = tiny_job(tmp_path)
    job["sample"] = {"prompts": ["a red circle --q 3"], "steps": 2}
    assert main(["validate", str(write_yaml(tmp_path / "job.yaml", job))]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "sample.prompts" in err and "unknown flag --q" in err
    assert not (tmp_path / "output").exists()
