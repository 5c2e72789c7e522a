"""`eri train` (full fine-tune) and `eri generate` through the CLI on the tiny SD1.5 and SDXL presets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

from eridiffusion.cli import main
from eridiffusion.config import load_config
from eridiffusion.models import build_family, load_family
from eridiffusion.networks import apply_adapter_files
from eridiffusion.training.loop import load_or_build, trainable_parameters
from tests.conftest import tiny_job, write_yaml


def sd_job(root: Path, arch: str, **train: Any) -> dict[str, Any]:
    """A 32 px job (VAE factor 8 x UNet factor 2 = 16 divides it) on 16 synthetic images."""
    job = tiny_job(root, name=arch, model={"arch": arch, "options": {"preset": "tiny"}})
    job["train"] = {"steps": 3, "batch_size": 4, "lr": 1e-3, "seed": 3, **train}
    job["save"] = {"every": 3, "keep": 1}
    job["sample"] = {"prompts": ["a red circle"], "steps": 2, "images_per_prompt": 1}
    job["datasets"] = [
        {
            "folder_path": str(root / "shapes"),
            "resolution": 32,
            "caption_dropout_rate": 0.25,
            "synthetic": {"kind": "shapes", "n": 16, "resolution": 32, "seed": 0},
        }
    ]
    return job


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_train_then_generate(arch: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = write_yaml(tmp_path / "job.yaml", sd_job(tmp_path, arch))
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "output" / arch
    assert f"trained {arch}: 3 steps" in capsys.readouterr().out
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all(m["loss"] > 0 for m in metrics)
    assert Image.open(run / "samples" / "step_000003.png").size == (128, 128)  # 32 px blown up
    model = run / "model"
    assert json.loads((model / "model_index.json").read_text())["_class_name"].startswith("StableDiffusion")
    # the trained weights (and only the trained components) changed
    trained = load_family(model)
    fresh = load_or_build(load_config(cfg))
    fresh_modules = fresh.modules()

    def differs(name: str) -> bool:
        before = fresh_modules[name].state_dict()
        return any(not torch.equal(v, before[k]) for k, v in trained.modules()[name].state_dict().items())

    changed = {name: differs(name) for name in fresh_modules}
    assert changed["denoiser"] and changed["text_encoder"] and not changed["vae"]

    out = tmp_path / "gen"
    args = ["generate", "--model", str(model), "--prompt", "a blue square", "--n", "2", "--steps", "3"]
    assert main([*args, "--seed", "7", "--sampler", "DPM++ 2M", "--out", str(out)]) == 0
    images = sorted(out.iterdir())
    assert [p.name for p in images] == ["0000-7.png", "0001-8.png"]
    img = Image.open(images[0])
    assert img.size == (32, 32)
    assert "Sampler: DPM++ 2M" in img.text["parameters"]


def test_storage_dtype_and_gradient_checkpointing(tmp_path: Path) -> None:
    """model.dtype bf16 keeps frozen components in bf16 and trained ones in fp32; gradient checkpointing
    gives the same loss and gradients as without."""
    job = sd_job(tmp_path, "sdxl", train_text_encoder=False, gradient_checkpointing=True)
    job["model"]["dtype"] = "bf16"
    cfg = load_config(write_yaml(tmp_path / "job.yaml", job))
    family = load_or_build(cfg)
    params = trainable_parameters(family, cfg)
    assert all(name.startswith("denoiser.") for name in params)
    assert family.unet.dtype == torch.float32 and family.unet.is_gradient_checkpointing
    assert {family.vae.dtype, *(m.dtype for m in family.text_encoders.values())} == {torch.bfloat16}

    def loss_and_grad(checkpointing: bool) -> tuple[float, torch.Tensor]:
        family.unet.train()
        if checkpointing:
            family.unet.enable_gradient_checkpointing()
        else:
            family.unet.disable_gradient_checkpointing()
        g = torch.Generator().manual_seed(0)
        pixels = torch.rand((2, 3, 32, 32), generator=g) * 2 - 1
        x0 = family.encode_images(pixels)
        target = family.objective.make_target(
            x0, torch.randn(x0.shape, generator=g), torch.tensor([100, 800])
        )
        cond = family.encode_prompt(["a red circle", ""])
        loss = torch.nn.functional.mse_loss(
            family.predict(target.noisy, target.timesteps, cond), target.target
        )
        family.unet.zero_grad()
        loss.backward()
        return loss.item(), family.unet.conv_in.weight.grad.clone()

    plain, with_ckpt = loss_and_grad(False), loss_and_grad(True)
    assert plain[0] == pytest.approx(with_ckpt[0], rel=1e-6)
    torch.testing.assert_close(plain[1], with_ckpt[1])
    assert main(["train", str(write_yaml(tmp_path / "job.yaml", job)), "train.steps=2"]) == 0


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_lora_file_loads_in_diffusers_pipelines(arch: str, tmp_path: Path) -> None:
    """A kohya LoRA trained with `eri train` (UNet + text encoders) loads into diffusers' own pipeline
    built from the same base folder, and fusing it there gives exactly our merged weights."""
    base = tmp_path / "base"
    build_family(arch, {"preset": "tiny"}, seed=0).save_pretrained(base)
    job = sd_job(tmp_path, arch, steps=2, lr=1e-2)
    job["model"] = {"name_or_path": str(base)}
    job["network"] = {"type": "lora", "linear": 4, "linear_alpha": 2}
    job["sample"] = {"prompts": []}
    assert main(["train", str(write_yaml(tmp_path / "lora.yaml", job))]) == 0
    lora = tmp_path / "output" / arch / f"{arch}.safetensors"
    prefixes = {k.split("_")[1] for k in load_file(lora)}
    assert prefixes == ({"unet", "te"} if arch == "sd15" else {"unet", "te1", "te2"})

    pipeline = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}[arch]
    pipe = pipeline.from_pretrained(base, local_files_only=True)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora()
    ours = load_family(base)
    apply_adapter_files(ours, [(lora, 1.0)])
    untouched = load_family(base)
    for name in ("text_encoder", "text_encoder_2", "unet") if arch == "sdxl" else ("text_encoder", "unet"):
        component = "denoiser" if name == "unet" else name
        mine, before = ours.modules()[component].state_dict(), untouched.modules()[component].state_dict()
        theirs = {
            k.replace(".base_layer", ""): v
            for k, v in getattr(pipe, name).state_dict().items()
            if "lora" not in k
        }
        assert any(not torch.equal(mine[k], before[k]) for k in mine), f"{name}: the LoRA changed nothing"
        assert all(torch.equal(theirs[k], mine[k]) for k in mine), f"{name}: diffusers fused other weights"


def test_merge_writes_an_original_layout_single_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """eri merge --out x.safetensors: the LoRA baked into an A1111/ComfyUI-style checkpoint, loadable."""
    from eridiffusion.config.schema import NetworkConfig
    from eridiffusion.models import build_family, load_family
    from eridiffusion.networks import attach_network, export_network

    base = tmp_path / "base"
    build_family("sd15", {"preset": "tiny"}, seed=0).save_pretrained(base)
    trained = load_family(base)
    cfg = NetworkConfig(linear=4, linear_alpha=4)
    params = attach_network(trained, cfg, train_text_encoder=True, seed=3)
    with torch.no_grad():
        for p in params.values():
            p.normal_(0, 0.05)
    lora = export_network(trained, cfg, tmp_path / "l.safetensors", "kohya", "fp32", {})
    single = tmp_path / "merged.safetensors"
    assert main(["merge", "--model", str(base), "--lora", str(lora), "--out", str(single)]) == 0
    assert main(["merge", "--model", str(base), "--lora", str(lora), "--out", str(tmp_path / "merged")]) == 0
    from_file, from_folder = load_family(single), load_family(tmp_path / "merged")
    assert from_file.arch == "sd15"
    for name, module in from_folder.modules().items():
        if name == "vae":
            continue
        a, b = module.state_dict(), from_file.modules()[name].state_dict()
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name
    capsys.readouterr()
