"""Adapters and adapter files on the tiny family: every type round-trips, kohya files load in diffusers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from eridiffusion.config.schema import NetworkConfig
from eridiffusion.models import ModelFamily, build_family
from eridiffusion.networks import (
    adapter_state,
    apply_adapter,
    attach_network,
    export_network,
    merge_adapters,
    parse_adapter_arg,
    read_adapter_file,
)
from eridiffusion.networks.adapters import adapter_parameters, select_targets
from eridiffusion.networks.formats import convert_adapter_file
from tests.conftest import TINY_OPTIONS


def _family() -> ModelFamily:
    fam = build_family("tiny", TINY_OPTIONS, seed=0)
    for m in fam.modules().values():
        m.eval()
    return fam


def _randomise(family: ModelFamily) -> None:
    """Adapters start as a no-op (B = 0); give them weights so round trips are meaningful."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in adapter_parameters(family).items():
            if "magnitude" in name:
                p.mul_(1 + 0.1 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _outputs(family: ModelFamily) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn((2, 12, 8, 8), generator=g)
    with torch.no_grad():
        cond = family.encode_prompt(["a red circle", "a blue square"])
        return family.predict(x, torch.tensor([10, 700]), cond)


NETWORKS = {
    "lora": NetworkConfig(type="lora", linear=4, linear_alpha=2, conv=2, conv_alpha=1),
    "dora": NetworkConfig(type="dora", linear=4, linear_alpha=4, conv=2),
    "loha": NetworkConfig(type="loha", linear=4, linear_alpha=2, conv=2),
    "lokr": NetworkConfig(type="lokr", linear=4, linear_alpha=2, conv=2),
}


@pytest.mark.parametrize("kind", sorted(NETWORKS))
@pytest.mark.parametrize("train_te", [False, True])
def test_saved_file_reproduces_the_adapter_model(kind: str, train_te: bool, tmp_path: Path) -> None:
    cfg = NETWORKS[kind]
    trained = _family()
    params = attach_network(trained, cfg, train_text_encoder=train_te)
    assert params and all(p.requires_grad for p in params.values())
    assert not any(p.requires_grad for n, p in trained.unet.named_parameters() if "base_layer" in n)
    _randomise(trained)
    expected = _outputs(trained)
    path = export_network(trained, cfg, tmp_path / "a.safetensors", "kohya", "fp32", {"eri_steps": "5"})

    keys = load_file(path)
    assert any(k.startswith("lora_unet_") for k in keys)
    assert any(k.startswith("lora_te_") for k in keys) == train_te
    bases = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    assert all(f"{b}.alpha" in keys for b in bases), "every adapted layer carries .alpha"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["eri_steps"] == "5" and meta["ss_network_dim"] == "4" and kind in meta["eri_network"]

    # inference: merge the file into a fresh copy of the base model
    fresh = _family()
    changed = apply_adapter(fresh, read_adapter_file(path, fresh), 1.0)
    assert changed == len(bases)
    torch.testing.assert_close(_outputs(fresh), expected, atol=2e-5, rtol=1e-4)

    # training: load the file into freshly injected adapters (network.init_from)
    again = _family()
    attach_network(again, cfg.model_copy(update={"init_from": str(path)}), train_text_encoder=train_te)
    torch.testing.assert_close(_outputs(again), expected, atol=1e-5, rtol=1e-5)

    # merge_adapters bakes the injected adapters in and leaves plain layers
    merge_adapters(trained)
    assert not adapter_state(trained)
    torch.testing.assert_close(_outputs(trained), expected, atol=2e-5, rtol=1e-4)


def test_multiplier_scales_the_update(tmp_path: Path) -> None:
    cfg = NETWORKS["lora"]
    trained = _family()
    attach_network(trained, cfg, train_text_encoder=False)
    _randomise(trained)
    path = export_network(trained, cfg, tmp_path / "a.safetensors", "kohya", "fp32", {})
    base = _outputs(_family())
    full, half = _family(), _family()
    apply_adapter(full, read_adapter_file(path, full), 1.0)
    apply_adapter(half, read_adapter_file(path, half), 0.5)
    layer = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    w0, w1, wh = (f.unet.get_submodule(layer).weight for f in (_family(), full, half))
    torch.testing.assert_close(wh - w0, 0.5 * (w1 - w0), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(_outputs(full), base)


def test_kohya_file_loaded_by_diffusers_matches_our_loader(tmp_path: Path) -> None:
    """diffusers' own kohya converter + load_lora_adapter on the same UNet gives our outputs."""
    cfg = NetworkConfig(type="lora", linear=4, linear_alpha=2)
    trained = _family()
    attach_network(trained, cfg, train_text_encoder=False)
    _randomise(trained)
    path = export_network(trained, cfg, tmp_path / "k.safetensors", "kohya", "fp32", {})

    ours = _family()
    apply_adapter(ours, read_adapter_file(path, ours), 1.0)
    theirs = _family()
    state, alphas = StableDiffusionPipeline.lora_state_dict(load_file(path))
    theirs.unet.load_lora_adapter(state, prefix="unet", network_alphas=alphas, adapter_name="k")
    torch.testing.assert_close(_outputs(theirs), _outputs(ours), atol=2e-5, rtol=1e-4)


def test_diffusers_layout_round_trip_and_convert(tmp_path: Path) -> None:
    cfg = NetworkConfig(type="lora", linear=4, linear_alpha=1)
    trained = _family()
    attach_network(trained, cfg, train_text_encoder=True)
    _randomise(trained)
    expected = _outputs(trained)
    diff = export_network(trained, cfg, tmp_path / "d.safetensors", "diffusers", "fp32", {})
    keys = load_file(diff)
    assert all(k.startswith(("unet.", "text_encoder.")) and ".lora_" in k for k in keys)
    loaded = _family()
    apply_adapter(loaded, read_adapter_file(diff, loaded), 1.0)
    torch.testing.assert_close(_outputs(loaded), expected, atol=2e-5, rtol=1e-4)

    kohya = convert_adapter_file(_family(), diff, tmp_path / "k.safetensors", "kohya", "fp32")
    back = _family()
    apply_adapter(back, read_adapter_file(kohya, back), 1.0)
    torch.testing.assert_close(_outputs(back), expected, atol=2e-5, rtol=1e-4)


def test_diffusers_layout_refuses_lycoris_types(tmp_path: Path) -> None:
    cfg = NETWORKS["loha"]
    fam = _family()
    attach_network(fam, cfg, train_text_encoder=False)
    with pytest.raises(ValueError, match="plain LoRA only"):
        export_network(fam, cfg, tmp_path / "x.safetensors", "diffusers", "fp16", {})


def test_foreign_file_is_rejected_and_stray_keys_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    foreign = tmp_path / "f.safetensors"
    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 8)}, foreign)
    with pytest.raises(ValueError, match="matches a layer"):
        read_adapter_file(foreign, _family())

    cfg = NetworkConfig(type="lora", linear=2, linear_alpha=2)
    fam = _family()
    attach_network(fam, cfg, train_text_encoder=False)
    good = export_network(fam, cfg, tmp_path / "g.safetensors", "kohya", "fp32", {})
    mixed = {**load_file(good), "lora_unet_not_a_layer.lora_down.weight": torch.zeros(2, 2)}
    save_file(mixed, tmp_path / "m.safetensors")
    with caplog.at_level("WARNING"):
        adapter = read_adapter_file(tmp_path / "m.safetensors", _family())
    assert adapter.unmatched == ["lora_unet_not_a_layer.lora_down.weight"]
    assert "1 tensors match no layer" in caplog.text


def test_target_presets_and_filters() -> None:
    unet = _family().unet
    attention = select_targets(unet, NetworkConfig(target="attention"))
    mlp = select_targets(unet, NetworkConfig(target="attention_mlp"))
    every = select_targets(unet, NetworkConfig(target="all_linear", conv=4))
    assert attention.linear and all(
        n.rsplit(".", 1)[-1] in {"to_q", "to_k", "to_v", "0"} for n in attention.linear
    )
    assert set(attention.linear) < set(mlp.linear) <= set(every.linear)
    assert any(n.endswith("ff.net.2") for n in mlp.linear) and not attention.conv
    assert every.conv and all(unet.get_submodule(n).kernel_size != (1, 1) for n in every.conv)
    only = select_targets(unet, NetworkConfig(target="attention", only_if_contains=["attn2"]))
    assert only.linear and all("attn2" in n for n in only.linear)
    ignored = select_targets(unet, NetworkConfig(target="attention", ignore_if_contains=["mid_block"]))
    assert ignored.linear and not any("mid_block" in n for n in ignored.linear)
    with pytest.raises(ValueError, match="no layer"):
        attach_network(_family(), NetworkConfig(only_if_contains=["nothing_like_this"]), False)


def test_parse_adapter_arg() -> None:
    assert parse_adapter_arg("a/b.safetensors") == (Path("a/b.safetensors"), 1.0)
    assert parse_adapter_arg("a/b.safetensors:0.6") == (Path("a/b.safetensors"), 0.6)
    assert parse_adapter_arg("a/b.safetensors:-1") == (Path("a/b.safetensors"), -1.0)
    assert parse_adapter_arg("C:/x.safetensors") == (Path("C:/x.safetensors"), 1.0)


@pytest.mark.parametrize(
    ("components", "train_text_encoder", "expected"),
    [
        (None, False, {"denoiser"}),
        (None, True, {"denoiser", "text_encoder"}),
        (["denoiser"], True, {"denoiser"}),
        (["text_encoder"], False, {"text_encoder"}),
        (["denoiser", "text_encoder"], False, {"denoiser", "text_encoder"}),
    ],
)
def test_network_components_choose_what_gets_adapters(
    components: list[str] | None, train_text_encoder: bool, expected: set[str]
) -> None:
    family = _family()
    params = attach_network(family, NetworkConfig(linear=2, components=components), train_text_encoder)
    assert {name.split(".")[0] for name in params} == expected


def test_a_text_encoder_component_that_matches_no_layer_is_an_error() -> None:
    cfg = NetworkConfig(linear=2, components=["text_encoder"], only_if_contains=["no_such_layer"])
    with pytest.raises(ValueError, match=r"network.components \['text_encoder'\]: no layer"):
        attach_network(_family(), cfg, False)
