"""`eri train` (full fine-tune, LoRA) and `eri generate` via the CLI on the tiny SD3.5 and Flux presets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from eridiffusion.cli import EXIT_USER_ERROR, main
from eridiffusion.config import load_config
from eridiffusion.models import build_family, load_family
from eridiffusion.training.loop import load_or_build
from tests.conftest import tiny_job, write_yaml


def flow_job(root: Path, arch: str, **options: Any) -> dict[str, Any]:
    """A 32 px job (tiny VAE factor 2 x 2x2 patches = 4 divides it) on 16 synthetic images."""
    job = tiny_job(root, name=arch, model={"arch": arch, "options": {"preset": "tiny", **options}})
    job["train"] = {"steps": 3, "batch_size": 4, "lr": 1e-3, "seed": 3}
    job["save"] = {"every": 3, "keep": 1}
    job["sample"] = {"prompts": ["a red circle"], "steps": 2, "images_per_prompt": 1, "sampler": "flow_euler"}
    job["datasets"] = [
        {
            "folder_path": str(root / "shapes"),
            "resolution": 32,
            "caption_dropout_rate": 0.25,
            "synthetic": {"kind": "shapes", "n": 16, "resolution": 32, "seed": 0},
        }
    ]
    return job


@pytest.mark.parametrize(
    ("arch", "options"),
    [("sd3", {"loss_weighting": "cosmap"}), ("flux", {"timestep_sampling": "uniform"})],
)
def test_train_then_generate(
    arch: str, options: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = write_yaml(tmp_path / "job.yaml", flow_job(tmp_path, arch, **options))
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "output" / arch
    assert f"trained {arch}: 3 steps" in capsys.readouterr().out
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all(m["loss"] > 0 for m in metrics)
    assert Image.open(run / "samples" / "step_000003.png").size == (128, 128)  # 32 px blown up
    model = run / "model"
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[arch]
    trained = load_family(model)
    assert trained.options.model_dump(exclude_unset=False).items() >= options.items()
    fresh = load_or_build(load_config(cfg)).modules()

    def differs(name: str) -> bool:
        before = fresh[name].state_dict()
        return any(not torch.equal(v, before[k]) for k, v in trained.modules()[name].state_dict().items())

    changed = {name: differs(name) for name in fresh}
    t5 = "text_encoder_3" if arch == "sd3" else "text_encoder_2"
    assert changed["denoiser"] and changed["text_encoder"] and not changed["vae"] and not changed[t5]

    out = tmp_path / "gen"
    args = ["generate", "--model", str(model), "--prompt", "a blue square", "--n", "2", "--steps", "3"]
    assert main([*args, "--seed", "7", "--out", str(out)]) == 0  # no --sampler: the model's default
    images = sorted(out.iterdir())
    assert [p.name for p in images] == ["0000-7.png", "0001-8.png"]
    img = Image.open(images[0])
    assert img.size == (32, 32) and "Sampler: Flow Euler" in img.text["parameters"]
    assert main([*args, "--sampler", "euler", "--out", str(tmp_path / "x")]) == EXIT_USER_ERROR
    assert "sampler 'euler' (Euler) is for epsilon/v-prediction models" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_lora_train_then_generate_with_it(arch: str, tmp_path: Path) -> None:
    job = flow_job(tmp_path, arch)
    job["network"] = {"type": "lora", "linear": 4, "linear_alpha": 4}
    job["train"]["train_text_encoder"] = False
    assert main(["train", str(write_yaml(tmp_path / "job.yaml", job))]) == 0
    adapter = tmp_path / "output" / arch / f"{arch}.safetensors"
    assert adapter.is_file()
    base = tmp_path / "base"
    build_family(arch, {"preset": "tiny"}, seed=job["train"].get("seed", 42)).save_pretrained(base)
    out = tmp_path / "g"
    args = ["generate", "--model", str(base), "--prompt", "a red circle", "--steps", "2", "--out", str(out)]
    assert main([*args, "--lora", f"{adapter}:0.8"]) == 0
    assert (out / "0000-0.png").is_file()


def test_flow_settings_mistakes_stop_before_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job = flow_job(tmp_path, "sd3")
    job["sample"]["sampler"] = "ddim"
    cfg = str(write_yaml(tmp_path / "a.yaml", job))
    assert main(["train", cfg]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "sample.sampler: sampler 'ddim' (DDIM) is for epsilon/v-prediction models" in err
    assert "flow_euler" in err and not (tmp_path / "output" / "sd3" / "checkpoints").exists()
    assert main(["validate", cfg]) == EXIT_USER_ERROR
    assert "sample.sampler: sampler 'ddim' (DDIM)" in capsys.readouterr().err
    assert main(["validate", cfg, "sample.sampler=flow_euler"]) == 0
    assert "objective flow" in capsys.readouterr().out

    job = flow_job(tmp_path, "flux")
    job["train"]["min_snr_gamma"] = 5.0
    assert main(["train", str(write_yaml(tmp_path / "b.yaml", job))]) == EXIT_USER_ERROR
    assert (
        "train.min_snr_gamma: min-SNR weighting is defined for epsilon and v_prediction"
        in capsys.readouterr().err
    )

    job = flow_job(tmp_path, "flux", timestep_sampling="sigmoid")
    assert main(["train", str(write_yaml(tmp_path / "c.yaml", job))]) == EXIT_USER_ERROR
    assert "model.options.timestep_sampling: Input should be" in capsys.readouterr().err
