"""LoRA files other tools write, read by ``eri``: diffusers' ``save_lora_weights`` (with its
``lora_adapter_metadata`` header carrying alpha, and under transformers >= 5 CLIP keys without
``text_model.``) and peft's ``save_pretrained`` folders (alpha in ``adapter_config.json``).

The reference is the model with the adapters injected by peft itself; applying the file as ``eri merge``
does must give the same denoiser output, text encoders included.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import (
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, inject_adapter_in_model
from safetensors import safe_open

from eridiffusion.cli import main
from eridiffusion.networks import apply_adapter_files, read_adapter_file
from tests.families.lora_common import denoise, tiny_family

SAVERS = {
    "sd15": (StableDiffusionPipeline, "unet"),
    "sdxl": (StableDiffusionXLPipeline, "unet"),
    "flux": (FluxPipeline, "transformer"),
    "sd3": (StableDiffusion3Pipeline, "transformer"),
}
DENOISER_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _randomise_lora(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("arch", sorted(SAVERS))
def test_diffusers_saved_lora_with_alpha_header(arch: str, tmp_path: Path) -> None:
    """r=4, lora_alpha=8 (scale 2) on the denoiser and every CLIP encoder, saved by the pipeline class's
    own ``save_lora_weights`` with each component's adapter metadata."""
    pipeline, denoiser_name = SAVERS[arch]
    family = tiny_family(arch)
    configs = {
        "denoiser": LoraConfig(r=4, lora_alpha=8, target_modules=DENOISER_TARGETS),
        "text_encoder": LoraConfig(r=2, lora_alpha=1, target_modules=TE_TARGETS),
        "text_encoder_2": LoraConfig(r=4, lora_alpha=2, target_modules=TE_TARGETS, use_rslora=True),
    }
    layers, metadata = {}, {}
    for component, module in family.modules().items():
        is_clip = component in configs and type(module).__name__.startswith("CLIP")
        if component != "denoiser" and not is_clip:
            continue
        inject_adapter_in_model(configs[component], module)  # what add_adapter does (peft < 0.22 here)
        _randomise_lora(module, seed=len(layers))
        name = denoiser_name if component == "denoiser" else component
        layers[f"{name}_lora_layers"] = get_peft_model_state_dict(module)
        metadata[f"{name}_lora_adapter_metadata"] = configs[component].to_dict()
    assert len(layers) == (2 if arch in ("sd15", "flux") else 3)
    expected = denoise(family)
    pipeline.save_lora_weights(tmp_path, **layers, **metadata)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())  # noqa: SIM118
        assert "lora_adapter_metadata" in (f.metadata() or {})
    # transformers >= 5.6 flattened CLIPTextModel (not ...WithProjection): diffusers then writes
    # text_encoder.encoder.layers..., without the text_model. every other tool uses
    flat = not hasattr(tiny_family(arch).modules()["text_encoder"], "text_model")
    spelling = "text_encoder.encoder.layers." if flat else "text_encoder.text_model.encoder.layers."
    assert any(k.startswith(spelling) for k in keys)

    fresh = tiny_family(arch)
    adapter = read_adapter_file(path, fresh)
    assert adapter.unmatched == []
    apply_adapter_files(fresh, [(path, 1.0)])
    diff = (denoise(fresh) - expected).abs().max().item()
    print(f"{arch}: eri merge of diffusers' file vs peft max abs diff {diff:.3g}")
    torch.testing.assert_close(denoise(fresh), expected, atol=2e-5, rtol=1e-4)


def test_peft_folder_alpha_from_adapter_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``PeftModel.save_pretrained`` output (``adapter_model.safetensors`` + ``adapter_config.json``, with an
    ``alpha_pattern`` override), given to ``eri merge`` as the folder."""
    family = tiny_family("sd15")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=DENOISER_TARGETS, alpha_pattern={"attn2.to_q": 2})
    peft_unet = get_peft_model(family.modules()["denoiser"], config)
    _randomise_lora(peft_unet, seed=3)
    expected = denoise(family)
    peft_unet.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["lora_alpha"] == 8

    fresh = tiny_family("sd15")
    adapter = read_adapter_file(tmp_path / "adapter", fresh)
    assert adapter.unmatched == []
    attn2 = next(m for k, m in adapter.modules.items() if k[1].endswith("attn2.to_q"))
    attn1 = next(m for k, m in adapter.modules.items() if k[1].endswith("attn1.to_q"))
    assert (attn2.scale(), attn1.scale()) == (0.5, 2.0)
    apply_adapter_files(fresh, [(tmp_path / "adapter", 1.0)])
    torch.testing.assert_close(denoise(fresh), expected, atol=2e-5, rtol=1e-4)

    base = tmp_path / "base"
    tiny_family("sd15").save_pretrained(base)
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(base), "--lora", str(tmp_path / "adapter"), "--out", str(out)]) == 0
    assert "wrote merged model" in capsys.readouterr().out


def test_bad_peft_folders_are_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds neither adapter_model.safetensors"):
        read_adapter_file(tmp_path / "empty", tiny_family("sd15"))
    base = tmp_path / "base"
    tiny_family("sd15").save_pretrained(base)
    args = ["merge", "--model", str(base), "--lora", str(tmp_path / "empty"), "--out", str(tmp_path / "m")]
    assert main(args) == 2
    assert "adapter folder" in capsys.readouterr().err
    family = tiny_family("sd15")
    peft_unet = get_peft_model(family.modules()["denoiser"], LoraConfig(r=2, target_modules=["to_q"]))
    peft_unet.save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text('{"lora_alpha": "eight"}')
    with pytest.raises(ValueError, match="adapter_config.json.*numeric lora_alpha"):
        read_adapter_file(tmp_path / "a", tiny_family("sd15"))
