"""LoRA files in the original layouts (kohya's Flux ``lora_unet_double_blocks_0_img_attn_qkv``, SD3's
``lora_unet_joint_blocks_0_x_block_attn_qkv``) on the diffusers modules the flow families run.

The reference is independent of the splitting code: the LoRA update is added to the fused weights of the
model's own original-layout export (``transformer_to_original``), and that state converted back with the
single-file loader (diffusers' converter for SD3, ours -- tested against diffusers' -- for Flux) must equal
the model with the file applied.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from eridiffusion.cli import main
from eridiffusion.models import build_family
from eridiffusion.models.flow_common import FlowTransformerFamily
from eridiffusion.networks import apply_adapter_files, read_adapter_file
from eridiffusion.networks.formats import _layers, convert_adapter_file

RANK, ALPHA = 4, 2.0
FLUX_MODULES = [
    "double_blocks.0.img_attn.qkv",
    "double_blocks.0.txt_attn.qkv",
    "double_blocks.0.img_attn.proj",
    "double_blocks.0.img_mod.lin",
    "double_blocks.0.txt_mlp.0",
    "double_blocks.0.img_mlp.2",
    "single_blocks.0.linear1",
    "single_blocks.1.linear2",
    "single_blocks.1.modulation.lin",
    "guidance_in.in_layer",
    "img_in",
    "final_layer.adaLN_modulation.1",
]
SD3_MODULES = [
    "joint_blocks.0.x_block.attn.qkv",
    "joint_blocks.0.context_block.attn.qkv",
    "joint_blocks.1.context_block.adaLN_modulation.1",
    "final_layer.adaLN_modulation.1",
    "final_layer.linear",
]
TE1_MODULE = "encoder.layers.0.self_attn.q_proj"


def _family(arch: str, preset: str = "tiny") -> FlowTransformerFamily:
    family = build_family(arch, {"preset": preset}, seed=0)
    for m in family.modules().values():
        m.eval()
    return family


def _original(family: FlowTransformerFamily) -> dict[str, torch.Tensor]:
    return family.transformer_to_original(family.transformer.state_dict(), dict(family.transformer.config))


def _bfl_lora(family: FlowTransformerFamily, modules: list[str], seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya file over original-layout module names, random down/up at the real layer shapes."""
    g = torch.Generator().manual_seed(seed)
    original = _original(family)
    out: dict[str, torch.Tensor] = {}
    for module in modules:
        rows, cols = original[f"{module}.weight"].shape
        base = f"lora_unet_{module.replace('.', '_')}"
        out[f"{base}.lora_down.weight"] = torch.randn(RANK, cols, generator=g) * 0.1
        out[f"{base}.lora_up.weight"] = torch.randn(rows, RANK, generator=g) * 0.1
        out[f"{base}.alpha"] = torch.tensor(ALPHA)
    return out


def _expected_transformer(
    family: FlowTransformerFamily, lora: dict[str, torch.Tensor], modules: list[str]
) -> dict[str, torch.Tensor]:
    """The LoRA merged into the fused original weights, then converted to diffusers names."""
    original = _original(family)
    for module in modules:
        base = f"lora_unet_{module.replace('.', '_')}"
        delta = lora[f"{base}.lora_up.weight"] @ lora[f"{base}.lora_down.weight"]
        original[f"{module}.weight"] = original[f"{module}.weight"] + ALPHA / RANK * delta
    return family.transformer_from_original(original, dict(family.transformer.config))


def _assert_transformer(family: FlowTransformerFamily, expected: dict[str, torch.Tensor]) -> None:
    state = family.transformer.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, atol=1e-6, rtol=1e-5, msg=key)


@torch.no_grad()
def _outputs(family: FlowTransformerFamily) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, *family.latent_shape(32, 32), generator=g)
    return family.predict(z, torch.tensor([150.0, 800.0]), family.encode_prompt(["a red circle", ""]))


def _te1_layer(family: FlowTransformerFamily) -> tuple[str, torch.Tensor]:
    """(kohya name, weight) of CLIP-L's first q_proj, as sd-scripts names it (``lora_te1_text_model_*``)."""
    key = next(k for k in _layers(family) if k[0] == "text_encoder" and k[1].endswith(TE1_MODULE))
    name = family.lora_key_names(*key)[0]
    assert name == "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    return name, _layers(family)[key].weight.detach().clone()


@pytest.fixture(scope="module")
def flux_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A kohya Flux LoRA in BFL names, a CLIP-L entry and two entries this model has no layer for."""
    family = _family("flux")
    lora = _bfl_lora(family, FLUX_MODULES)
    name, weight = _te1_layer(family)
    g = torch.Generator().manual_seed(9)
    lora[f"{name}.lora_down.weight"] = torch.randn(RANK, weight.shape[1], generator=g)
    lora[f"{name}.lora_up.weight"] = torch.randn(weight.shape[0], RANK, generator=g)
    lora[f"{name}.alpha"] = torch.tensor(1.0)
    lora["lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight"] = torch.zeros(RANK, 32)
    lora["lora_unet_not_a_layer.lora_up.weight"] = torch.zeros(32, RANK)
    path = tmp_path_factory.mktemp("bfl") / "kohya_flux.safetensors"
    save_file(lora, path)
    return path, lora


def test_flux_kohya_bfl_file_applies_as_the_fused_update(
    flux_file: tuple[Path, dict[str, torch.Tensor]], caplog: pytest.LogCaptureFixture
) -> None:
    path, lora = flux_file
    family = _family("flux")
    expected = _expected_transformer(family, lora, FLUX_MODULES)
    name, te_weight = _te1_layer(family)
    with caplog.at_level(logging.WARNING):
        adapter = read_adapter_file(path, family)
    assert sorted(adapter.unmatched) == [
        "lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight",
        "lora_unet_not_a_layer.lora_up.weight",
    ]
    assert "2 tensors match no layer" in caplog.text
    # q/k/v share down and alpha, each takes its own rows of up
    parts = [adapter.modules[("denoiser", f"transformer_blocks.0.attn.to_{p}")] for p in "qkv"]
    up = lora["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    for part, rows in zip(parts, up.split(32), strict=True):
        assert part.alpha == ALPHA and torch.equal(part.tensors["lora_up.weight"], rows)
    mlp = adapter.modules[("denoiser", "single_transformer_blocks.0.proj_mlp")].tensors["lora_up.weight"]
    assert torch.equal(mlp, lora["lora_unet_single_blocks_0_linear1.lora_up.weight"][96:])

    apply_adapter_files(family, [(path, 1.0)])
    _assert_transformer(family, expected)
    te_delta = lora[f"{name}.lora_up.weight"] @ lora[f"{name}.lora_down.weight"] / RANK
    te_now = next(
        w for k, w in _layers(family).items() if k[0] == "text_encoder" and k[1].endswith(TE1_MODULE)
    )
    torch.testing.assert_close(te_now.weight, te_weight + te_delta, atol=1e-6, rtol=1e-5)


def test_flux_convert_to_our_layout_applies_identically(
    flux_file: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    """``eri convert`` rewrites the file in sd-scripts' BFL names again (each fused layer's parts joined
    block-diagonally: linear1's four rank-4 parts become one rank-16 LoRA), and in diffusers' layout; both
    give the same model as the BFL-named file."""
    path, _ = flux_file
    direct = _family("flux")
    apply_adapter_files(direct, [(path, 1.0)])
    expected = _outputs(direct)

    model_dir = tmp_path / "flux"
    _family("flux").save_pretrained(model_dir)
    ours = tmp_path / "ours.safetensors"
    assert main(["convert", str(path), str(ours), "--model", str(model_dir), "--dtype", "fp32"]) == 0
    keys = load_file(ours)
    assert all(k.startswith(("lora_unet_", "lora_te1_")) for k in keys)
    assert keys["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (224, 4 * RANK)
    diffusers = convert_adapter_file(_family("flux"), path, tmp_path / "d.safetensors", "diffusers", "fp32")
    for converted in (ours, diffusers):
        family = _family("flux")
        adapter = read_adapter_file(converted, family)
        assert adapter.unmatched == []
        apply_adapter_files(family, [(converted, 1.0)])
        _assert_transformer(family, direct.transformer.state_dict())
        torch.testing.assert_close(_outputs(family), expected, atol=1e-5, rtol=1e-4)


def test_sd3_kohya_mmdit_file_applies_as_the_fused_update(tmp_path: Path) -> None:
    family = _family("sd3")
    lora = _bfl_lora(family, SD3_MODULES, seed=1)
    expected = _expected_transformer(family, lora, SD3_MODULES)
    save_file(lora, tmp_path / "sd3.safetensors")
    apply_adapter_files(family, [(tmp_path / "sd3.safetensors", 1.0)])
    _assert_transformer(family, expected)


def test_peft_style_bfl_names_and_split_qkv_files(tmp_path: Path) -> None:
    """``diffusion_model.*.lora_A/B`` names (no alpha: scale 1), and kohya's ``split_qkv`` save format, a
    rank-3r LoRA with block-diagonal ``up`` that each part keeps at its own rank r (alpha follows)."""
    family = _family("flux")
    g = torch.Generator().manual_seed(4)
    down = torch.randn(3 * RANK, 32, generator=g)
    up = torch.block_diag(*(torch.randn(32, RANK, generator=g) for _ in range(3)))
    peft_down, peft_up = torch.randn(RANK, 32, generator=g), torch.randn(224, RANK, generator=g)
    lora = {
        "lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight": down,
        "lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight": up,
        "lora_unet_double_blocks_0_txt_attn_qkv.alpha": torch.tensor(6.0),
        "diffusion_model.single_blocks.1.linear1.lora_A.weight": peft_down,
        "diffusion_model.single_blocks.1.linear1.lora_B.weight": peft_up,
    }
    save_file(lora, tmp_path / "mixed.safetensors")
    adapter = read_adapter_file(tmp_path / "mixed.safetensors", family)
    for i, p in enumerate("qkv"):
        part = adapter.modules[("denoiser", f"transformer_blocks.0.attn.add_{p}_proj")]
        assert part.rank == RANK and part.alpha == pytest.approx(2.0)
        assert torch.equal(part.tensors["lora_down.weight"], down[i * RANK : (i + 1) * RANK])

    original = _original(family)
    original["double_blocks.0.txt_attn.qkv.weight"] += 6.0 / (3 * RANK) * up @ down
    original["single_blocks.1.linear1.weight"] += peft_up @ peft_down
    expected = family.transformer_from_original(original, dict(family.transformer.config))
    apply_adapter_files(family, [(tmp_path / "mixed.safetensors", 1.0)])
    _assert_transformer(family, expected)


def test_fused_names_refuse_lycoris_wrong_sizes_and_mixed_layouts(tmp_path: Path) -> None:
    family = _family("flux")
    base = "lora_unet_double_blocks_0_img_attn_qkv"
    loha = {f"{base}.hada_w1_a": torch.zeros(96, 2), f"{base}.hada_w1_b": torch.zeros(2, 32)}
    save_file(loha, tmp_path / "loha.safetensors")
    with pytest.raises(ValueError, match=f"'{base}': loha adapters on the original layout"):
        read_adapter_file(tmp_path / "loha.safetensors", family)

    wide = {
        f"{base}.lora_down.weight": torch.zeros(RANK, 32),
        f"{base}.lora_up.weight": torch.zeros(99, RANK),
    }
    save_file(wide, tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match="99 output rows .* have 96; is it for another model size"):
        read_adapter_file(tmp_path / "wide.safetensors", family)

    ours = "lora_transformer_transformer_blocks_0_attn_to_k"
    both = {
        f"{base}.lora_down.weight": torch.zeros(RANK, 32),
        f"{base}.lora_up.weight": torch.zeros(96, RANK),
        f"{ours}.lora_down.weight": torch.zeros(RANK, 32),
        f"{ours}.lora_up.weight": torch.zeros(32, RANK),
    }
    save_file(both, tmp_path / "both.safetensors")
    with pytest.raises(ValueError, match="both adapt transformer_blocks.0.attn.to_k"):
        read_adapter_file(tmp_path / "both.safetensors", family)


def test_schnell_reports_the_guidance_embedder_of_a_dev_lora(tmp_path: Path) -> None:
    schnell = _family("flux", "tiny_schnell")
    lora = _bfl_lora(_family("flux"), ["guidance_in.in_layer", "img_in"])
    save_file(lora, tmp_path / "dev.safetensors")
    adapter = read_adapter_file(tmp_path / "dev.safetensors", schnell)
    assert sorted(adapter.unmatched) == sorted(k for k in lora if k.startswith("lora_unet_guidance_in"))
    assert list(adapter.modules) == [("denoiser", "x_embedder")]
