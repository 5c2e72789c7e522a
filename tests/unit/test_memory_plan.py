"""The pre-flight estimate traces the trainer's step: the same loss as the trainer, the same figures on fake
tensors as on real ones, parts that add up to the weights' exact bytes, and each memory option moving the
part it should."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from eridiffusion.config.schema import JobConfig
from eridiffusion.data.loader import Batch
from eridiffusion.models import build_family
from eridiffusion.models.stable_diffusion import load_preset
from eridiffusion.training.memory_plan import _loaded_preset, estimate_memory, step_loss
from eridiffusion.training.memory_report import format_estimate
from eridiffusion.training.preservation import OutputPreservation
from eridiffusion.training.stages import single_stage_plan, trainable_parameters
from eridiffusion.training.step import diffusion_loss
from tests.conftest import TINY_OPTIONS


def job(arch: str, options: dict[str, Any], resolution: int, **train: Any) -> JobConfig:
    cached = train.pop("cached", False)
    network = train.pop("network", {"type": "lora", "linear": 4})
    return JobConfig.model_validate(
        {
            "name": "plan",
            "model": {"arch": arch, "options": options, "dtype": train.pop("dtype", "fp32")},
            "network": network,
            "train": {"batch_size": 2, "mixed_precision": "no", **train},
            "datasets": [
                {
                    "folder_path": "unused",
                    "resolution": resolution,
                    "cache_latents_to_disk": cached,
                    "cache_text_embeddings": cached,
                }
            ],
        }
    )


@pytest.mark.parametrize("arch,options", [("tiny", TINY_OPTIONS), ("sdxl", {"preset": "tiny"})])
def test_step_loss_is_the_trainers_loss(arch: str, options: dict[str, Any]) -> None:
    cfg = job(arch, options, 64 if arch == "sdxl" else 16, min_snr_gamma=5.0)
    family = build_family(arch, options, seed=0)
    trainable_parameters(family, cfg)
    n, side = 2, cfg.datasets[0].resolutions[0]
    batch = Batch(
        pixels=torch.rand(n, 3, side, side) * 2 - 1,
        captions=["a red circle", "a blue square"],
        dropout_rates=torch.zeros(n),
        epoch=0,
        loss_weights=torch.tensor([1.0, 0.5]),
        original_sizes=torch.full((n, 2), side),
        crops=torch.zeros(n, 2, dtype=torch.long),
    )
    cpu = torch.device("cpu")
    ours = step_loss(family, batch, cfg, torch.Generator().manual_seed(7), cpu)
    trainer = diffusion_loss(family, batch, cfg, torch.Generator().manual_seed(7), cpu)
    assert torch.equal(ours, trainer)


def test_fake_trace_gives_the_real_trace_figures() -> None:
    cfg = job("sdxl", {"preset": "tiny"}, 128, gradient_checkpointing=True)
    fake, real = estimate_memory(cfg), estimate_memory(cfg, fake=False)
    assert fake.peak == real.peak and fake.activations == real.activations and fake.weights == real.weights


def test_parts_add_up_and_weights_are_exact() -> None:
    cfg = job("tiny", TINY_OPTIONS, 16)
    e = estimate_memory(cfg, block=1)
    family = build_family("tiny", TINY_OPTIONS, seed=0)
    params = trainable_parameters(family, cfg)
    tensors = [t for m in family.modules().values() for t in [*m.parameters(), *m.buffers()]]
    trained = sum(p.numel() * 4 for p in params.values())
    assert e.trainable == trained
    assert e.weights == sum(t.numel() * t.element_size() for t in tensors) - trained
    assert e.optimizer_state == 2 * trained  # AdamW: two fp32 moments
    assert e.peak == e.weights + e.trainable + e.grads + e.optimizer_state + e.caches + e.activations
    text = format_estimate(e)
    assert "peak device memory" in text and "fits" not in text  # no --gpu-gb, no verdict
    small = format_estimate(dataclasses.replace(e, gpu_gb=0.5))
    assert "does NOT fit a 0.5 GiB GPU" in small and "train.gradient_checkpointing: true" in small
    roomy = format_estimate(dataclasses.replace(e, gpu_gb=80))
    assert "fits a 80 GiB GPU" in roomy and "warning: building the caches" not in roomy
    tight = format_estimate(dataclasses.replace(e, gpu_gb=80, preparing=100 * 2**30))
    assert "warning: building the caches puts 100.0 GiB of encoder weights" in tight


def test_memory_options_move_the_part_they_should() -> None:
    sdxl = {"preset": "tiny"}
    base = estimate_memory(job("sdxl", sdxl, 64))
    checkpointed = estimate_memory(job("sdxl", sdxl, 64, gradient_checkpointing=True))
    assert checkpointed.activations < 0.7 * base.activations and checkpointed.weights == base.weights
    cached = estimate_memory(job("sdxl", sdxl, 64, cached=True, train_text_encoder=False))
    assert cached.weights < base.weights and cached.caches > 0
    assert (cached.text_encoders, cached.vae) == ("cached, off the device", "cached latents, off the device")
    accumulating = estimate_memory(job("sdxl", sdxl, 64, gradient_accumulation_steps=2))
    assert accumulating.grads == base.trainable and base.grads < base.trainable
    full = job("sdxl", sdxl, 64, network=None, train_text_encoder=False)
    adamw = estimate_memory(full)
    assert adamw.optimizer_state == 2 * adamw.trainable
    full.train.optimizer.type = "adamw8bit"
    eight_bit = estimate_memory(full)
    assert eight_bit.optimizer_state < 0.6 * adamw.optimizer_state
    flux = job("flux", {"preset": "tiny"}, 32, dtype="bf16", cached=True, train_text_encoder=False)
    bf16 = estimate_memory(flux, gpu_gb=24, block=1)
    fp8 = estimate_memory(flux, quantize="fp8", block=1)
    nf4 = estimate_memory(flux, quantize="nf4", block=1)
    assert nf4.weights < fp8.weights < 0.7 * bf16.weights and bf16.fits is True
    swapped = estimate_memory(flux, blocks_to_swap=1, block=1)  # 3 blocks take turns in 2 places
    assert swapped.weights < bf16.weights and "1 fewer blocks on the device" in " ".join(swapped.notes)


def test_bf16_trained_weights_halve_weights_and_gradients() -> None:
    """train.weights_dtype bf16: trained weights and gradients in 2 bytes, AdamW's moments still fp32, and
    the fp32 slice the optimizer steps appears in the trace (here the whole tiny model is one slice)."""
    full = {"network": None, "train_text_encoder": False, "mixed_precision": "bf16"}
    fp32 = estimate_memory(job("sdxl", {"preset": "tiny"}, 64, **full), block=1)
    bf16 = estimate_memory(job("sdxl", {"preset": "tiny"}, 64, weights_dtype="bf16", **full), block=1)
    assert bf16.trainable * 2 == fp32.trainable and bf16.grads * 2 == fp32.trainable
    assert bf16.optimizer_state == fp32.optimizer_state == 2 * fp32.trainable
    assert any("train.weights_dtype" in n for n in bf16.notes)


def test_refusals_name_the_setting() -> None:
    with pytest.raises(ValueError, match="blocks_to_swap: sdxl has no list of repeated transformer blocks"):
        estimate_memory(job("sdxl", {"preset": "tiny"}, 64), blocks_to_swap=2)
    with pytest.raises(ValueError, match="quantize: 'fp4' is not one of"):
        estimate_memory(job("tiny", TINY_OPTIONS, 16), quantize="fp4")
    with pytest.raises(ValueError, match="blocks_to_swap: 99 would leave fewer than two"):
        estimate_memory(job("flux", {"preset": "tiny"}, 64), blocks_to_swap=99)


def test_a_loaded_model_is_planned_at_its_own_preset(tmp_path: Path) -> None:
    folder = tmp_path / "my-finetuned-model"
    (folder / "transformer").mkdir(parents=True)
    config = {"_class_name": "SD3Transformer2DModel", **load_preset("sd3", "medium")["transformer"]}
    (folder / "transformer" / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert _loaded_preset("sd3", folder) == ("medium", "its transformer config matches the 'medium' preset")
    assert _loaded_preset("flux", tmp_path / "flux1-schnell.safetensors")[0] == "schnell"
    assert _loaded_preset("sd3", tmp_path / "model.safetensors") == ("large", "the family's usual size")


def test_output_preservation_is_traced() -> None:
    """``train.diff_output_preservation`` adds a forward with the adapter (kept for backward) and one
    without: the trace is still the trainer's loss, and the estimate's activations grow."""
    plain = job("tiny", TINY_OPTIONS, 16)
    data = plain.model_dump()
    data["train"].update({"diff_output_preservation": True, "diff_output_preservation_class": "shape"})
    data["datasets"][0]["trigger_word"] = "sks"
    cfg = JobConfig.model_validate(data)
    family = build_family("tiny", TINY_OPTIONS, seed=0, captions=["sks a red circle", "a shape"])
    params = trainable_parameters(family, cfg)
    with torch.no_grad():
        for key, p in params.items():
            if "lora_B" in key:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    batch = Batch(pixels, ["sks a red circle"] * 2, torch.zeros(2), 0, torch.ones(2))
    cpu = torch.device("cpu")
    ours = step_loss(family, batch, cfg, torch.Generator().manual_seed(7), cpu)
    assert not torch.equal(ours, step_loss(family, batch, plain, torch.Generator().manual_seed(7), cpu))
    dop = OutputPreservation.for_stage(cfg, single_stage_plan(cfg, family).config, cfg.datasets, family)
    assert torch.equal(ours, diffusion_loss(family, batch, cfg, torch.Generator().manual_seed(7), cpu, dop))
    assert estimate_memory(cfg).activations > estimate_memory(plain).activations
