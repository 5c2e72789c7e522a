"""LoRA files we write, loaded by the tools people use: diffusers' ``load_lora_weights`` on every family and
target preset (denoiser output against ``eri merge``'s, max abs diff printed), and ComfyUI's key naming.

diffusers reads kohya files for SD1.5/SDXL/Flux and only its own layout for SD3 (it has no kohya-SD3
converter), so SD3 is checked with ``save.format: diffusers``. Its kohya-Flux converter hard-codes FLUX.1's
3072-wide fused ``linear1`` and keeps only block layers, hence the single-block case at real width.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from safetensors.torch import load_file

from eridiffusion.config.schema import NetworkConfig
from eridiffusion.models import ModelFamily, load_family
from eridiffusion.models.flow_common import FlowTransformerFamily
from eridiffusion.networks import (
    apply_adapter_files,
    attach_network,
    export_network,
    formats,
    read_adapter_file,
)
from eridiffusion.networks.adapters import select_targets
from tests.families.lora_common import denoise, eval_family, tiny_family

PIPELINES = {
    "sd15": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
    "flux": FluxPipeline,
    "sd3": StableDiffusion3Pipeline,
}
DIFFUSERS_FORMAT = {"sd3": "diffusers"}  # the format of each family that diffusers reads
TARGETS = ("attention", "attention_mlp", "all_linear")
PIPELINES_AND_TINY = ("tiny", "sd15", "sdxl", "flux", "sd3")


def _trained_lora(
    family: ModelFamily, cfg: NetworkConfig, path: Path, fmt: str, train_te: bool = False
) -> Path:
    """Adapters with random (non-zero) weights, exported as a file; the family keeps them injected."""
    params = attach_network(family, cfg, train_text_encoder=train_te, seed=1)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in params.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return export_network(family, cfg, path, fmt, "fp32", {})


def _compare(ours: ModelFamily, theirs_state: dict[str, torch.Tensor], base: ModelFamily, label: str) -> None:
    base.modules()["denoiser"].load_state_dict(theirs_state)
    _report(denoise(ours), denoise(base), label)


def _report(expected: torch.Tensor, got: torch.Tensor, label: str) -> None:
    diff = (expected - got).abs().max().item()
    print(f"{label}: diffusers vs eri merge max abs diff {diff:.3g}")
    assert diff <= 1e-5 * max(1.0, expected.abs().max().item()), label


def _diffusers_load(arch: str, base: Path, lora: Path) -> dict[str, torch.Tensor]:
    """The denoiser weights after diffusers' own loader and ``fuse_lora``."""
    if arch == "tiny":  # not a pipeline folder: diffusers' SD converter and the UNet's own loader
        unet = load_family(base).modules()["denoiser"]
        state, alphas = StableDiffusionPipeline.lora_state_dict(load_file(lora))
        unet.load_lora_adapter(state, prefix="unet", network_alphas=alphas, adapter_name="x")
        unet.fuse_lora()
        unet.unload_lora()
        return dict(unet.state_dict())
    pipe = PIPELINES[arch].from_pretrained(base, local_files_only=True)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    denoiser = pipe.unet if arch in ("sd15", "sdxl") else pipe.transformer
    return dict(denoiser.state_dict())


@pytest.mark.parametrize(
    ("arch", "target", "fmt"),
    [
        *(
            (arch, target, DIFFUSERS_FORMAT.get(arch, "kohya"))
            for arch in PIPELINES_AND_TINY
            for target in TARGETS
        ),
        ("sd15", "all_linear", "diffusers"),
        ("flux", "all_linear", "diffusers"),
    ],
)
def test_diffusers_loads_our_lora_like_eri_merge(arch: str, target: str, fmt: str, tmp_path: Path) -> None:
    base = tmp_path / "base"
    tiny_family(arch).save_pretrained(base)
    # diffusers' kohya-Flux converter sizes linear1 for FLUX.1 (3072 wide) and drops top-level layers:
    # single blocks are checked at real width below, the embedders/final layer are warned about at save
    flux_kohya = arch == "flux" and fmt == "kohya"
    only, ignore = (["transformer_blocks"], ["single_"]) if flux_kohya else ([], [])
    cfg = NetworkConfig(
        type="lora", linear=4, linear_alpha=2, target=target, only_if_contains=only, ignore_if_contains=ignore
    )
    lora = _trained_lora(eval_family(load_family(base)), cfg, tmp_path / "lora.safetensors", fmt)
    if flux_kohya:
        assert all(k.startswith("lora_unet_double_blocks_0_") for k in load_file(lora))
    ours = eval_family(load_family(base))
    apply_adapter_files(ours, [(lora, 1.0)])
    assert not torch.equal(denoise(ours), denoise(eval_family(load_family(base)))), "the LoRA changed nothing"
    _compare(
        ours, _diffusers_load(arch, base, lora), eval_family(load_family(base)), f"{arch}/{target}/{fmt}"
    )


def _wide_flux() -> ModelFamily:
    """The tiny Flux family with a FLUX.1-wide transformer (24 x 128 heads) of one single block only."""
    family = tiny_family("flux")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        family.transformer = FluxTransformer2DModel(
            in_channels=64,
            num_layers=0,
            num_single_layers=1,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=48,
            pooled_projection_dim=16,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ).eval()
    return family


@pytest.mark.parametrize(
    "target",
    [  # ~10 s each (a 190M-parameter model, three copies): attention_mlp covers all four linear1 parts
        pytest.param("attention", marks=pytest.mark.slow),
        "attention_mlp",
        pytest.param("all_linear", marks=pytest.mark.slow),
    ],
)
def test_diffusers_loads_flux_single_blocks_at_real_width(target: str, tmp_path: Path) -> None:
    """``lora_unet_single_blocks_0_linear1`` (q/k/v/mlp fused; only q/k/v with ``attention``) and
    ``linear2``/``modulation_lin`` through ``FluxPipeline.load_lora_weights``."""
    cfg = NetworkConfig(
        type="lora", linear=4, linear_alpha=8, target=target, only_if_contains=["single_transformer_blocks"]
    )
    lora = _trained_lora(_wide_flux(), cfg, tmp_path / "wide.safetensors", "kohya")
    names = {k.split(".")[0] for k in load_file(lora)}
    assert "lora_unet_single_blocks_0_linear1" in names and all("single_blocks_0" in n for n in names)

    # one 190M-parameter model: eri merge's output first, then the base weights back for diffusers
    family = _wide_flux()
    base_state = {k: v.clone() for k, v in family.transformer.state_dict().items()}
    before = denoise(family)
    apply_adapter_files(family, [(lora, 1.0)])
    expected = denoise(family)
    assert not torch.equal(expected, before), "the LoRA changed nothing"
    family.transformer.load_state_dict(base_state)
    del base_state
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**family.objective.scheduler_config()),
        vae=family.vae,
        text_encoder=family.text_encoders["text_encoder"],
        tokenizer=family.tokenizers["tokenizer"],
        text_encoder_2=family.text_encoders["text_encoder_2"],
        tokenizer_2=family.tokenizers["tokenizer_2"],
        transformer=family.transformer,
    )
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    family.transformer = pipe.transformer
    _report(expected, denoise(family), f"flux-wide/{target}")


_CLIP_LAYERS = r"encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])"


def _comfyui_names(family: ModelFamily) -> list[re.Pattern[str]]:
    """The adapter names ComfyUI's key map has for a Flux/SD3 checkpoint (comfy/lora.py, read for this
    test): ``lora_unet_`` + every original-layout weight with dots as underscores; for the CLIP encoders
    ``lora_te{1,2}_text_model_encoder_layers_N_<attention/mlp layer>`` and ``..._text_projection``, T5's
    weights as ``lora_te3_*``."""
    assert isinstance(family, FlowTransformerFamily)
    original = family.transformer_to_original(
        family.transformer.state_dict(), dict(family.transformer.config)
    )
    unet = {
        "lora_unet_" + k.removesuffix(".weight").replace(".", "_") for k in original if k.endswith(".weight")
    }
    return [
        re.compile("|".join(re.escape(n) for n in unet)),
        re.compile(rf"lora_te[12]_(text_model_{_CLIP_LAYERS}|text_projection)"),
        re.compile(r"lora_te3_encoder_block_\d+_layer_\d+_\w+"),  # T5: any weight of t5xxl.transformer
    ]


@pytest.mark.parametrize("target", ["attention", "all_linear"])
@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_kohya_flow_file_is_in_comfyui_names_and_reads_back(arch: str, target: str, tmp_path: Path) -> None:
    """Every key of a LoRA (denoiser and CLIP encoders) is one ComfyUI's key map loads; our own reader maps
    the fused original layers back to the same model, for inference and training (``attention`` leaves
    Flux's proj_mlp part of linear1 at zero: no adapter comes back for it)."""
    trained = tiny_family(arch)
    cfg = NetworkConfig(type="lora", linear=4, linear_alpha=2, target=target)
    lora = _trained_lora(trained, cfg, tmp_path / "k.safetensors", "kohya", train_te=True)
    bases = {k.split(".")[0] for k in load_file(lora)}
    names = _comfyui_names(tiny_family(arch))
    assert [b for b in bases if not any(n.fullmatch(b) for n in names)] == []
    fused = (
        "lora_unet_double_blocks_0_img_attn_qkv"
        if arch == "flux"
        else "lora_unet_joint_blocks_0_x_block_attn_qkv"
    )
    assert fused in bases and any(b.startswith("lora_te1_") for b in bases)

    expected = denoise(trained)
    fresh = tiny_family(arch)
    adapter = read_adapter_file(lora, fresh)
    assert adapter.unmatched == []
    apply_adapter_files(fresh, [(lora, 1.0)])
    torch.testing.assert_close(denoise(fresh), expected, atol=2e-5, rtol=1e-4)
    # network.init_from: the fused layers split back to the trained ranks; final_layer's alpha/rank,
    # folded into up in the file, is unfolded for the injected adapter
    again = tiny_family(arch)
    attach_network(again, cfg.model_copy(update={"init_from": str(lora)}), train_text_encoder=True)
    torch.testing.assert_close(denoise(again), expected, atol=2e-5, rtol=1e-4)


def test_flow_attention_mlp_leaves_the_output_head_out() -> None:
    """A top-level ``proj_out`` (BFL's ``final_layer.linear``) is no attention/MLP layer, and exact paths
    keep peft from matching the single blocks' ``proj_out`` by suffix when they are filtered out."""
    flux = tiny_family("flux")
    mlp = select_targets(flux.modules()["denoiser"], NetworkConfig(target="attention_mlp"))
    assert "proj_out" not in mlp.linear and "single_transformer_blocks.0.proj_out" in mlp.linear
    cfg = NetworkConfig(target="all_linear", ignore_if_contains=["single_"])
    params = attach_network(flux, cfg, train_text_encoder=False)
    assert any(".proj_out." in n for n in params) and not any("single_" in n for n in params)


@pytest.mark.parametrize(
    ("arch", "fmt", "target", "expected"),
    [
        ("sd15", "diffusers", "attention", "ComfyUI will not load the UNet attention layers"),
        ("sd3", "kohya", "attention", "diffusers reads SD3 LoRAs only in its own layout"),
        ("flux", "kohya", "all_linear", "silently skips the top-level Flux layers of kohya files"),
        ("sd15", "kohya", "attention", None),
        ("flux", "kohya", "attention_mlp", None),
        ("flux", "diffusers", "all_linear", None),
    ],
)
def test_save_warns_where_the_file_will_not_load(
    arch: str,
    fmt: str,
    target: str,
    expected: str | None,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(formats, "_WARNED", set())
    cfg = NetworkConfig(type="lora", linear=2, linear_alpha=2, target=target)
    with caplog.at_level(logging.WARNING, logger="eridiffusion.networks.formats"):
        _trained_lora(tiny_family(arch), cfg, tmp_path / "w.safetensors", fmt)
        _trained_lora(tiny_family(arch), cfg, tmp_path / "w.safetensors", fmt)
    warnings = [r.getMessage() for r in caplog.records]
    if expected is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and expected in warnings[0] and "w.safetensors" in warnings[0]
