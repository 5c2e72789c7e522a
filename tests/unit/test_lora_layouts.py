"""Joining the LoRAs of a fused original layer (sd-scripts' split_qkv layout) and splitting them back."""

from __future__ import annotations

import torch

from eridiffusion.models.protocol import FusedLayer
from eridiffusion.networks.formats import ModuleAdapter, split_fused
from eridiffusion.networks.layouts import fuse_lora

QKV = FusedLayer("denoiser", ("q", "k", "v"))


def _update(t: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    down, up = t[f"{name}.lora_down.weight"], t[f"{name}.lora_up.weight"]
    return float(t[f"{name}.alpha"]) / down.shape[0] * up @ down


def test_parts_keep_their_update_with_mixed_scales_and_a_missing_part() -> None:
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g), 4.0)  # scale 2
    v = (torch.randn(3, 8, generator=g), torch.randn(6, 3, generator=g), 1.5)  # scale 0.5
    out = fuse_lora("lora_unet_x_qkv", QKV, [6, 6, 6], {0: q, 2: v})
    fused = _update(out, "lora_unet_x_qkv")
    assert out["lora_unet_x_qkv.lora_up.weight"].shape == (18, 5) and float(out["lora_unet_x_qkv.alpha"]) == 5
    torch.testing.assert_close(fused[:6], 2.0 * q[1] @ q[0])
    assert torch.equal(fused[6:12], torch.zeros(6, 8))  # k has no LoRA
    torch.testing.assert_close(fused[12:], 0.5 * v[1] @ v[0])

    same = fuse_lora("n", QKV, [6, 6, 6], {0: q, 1: (q[0], q[1], 4.0)})
    assert float(same["n.alpha"]) == 2.0 * 4  # one scale: alpha = scale x total rank, up unscaled
    adapter = ModuleAdapter(
        {k.split(".", 1)[1]: v for k, v in same.items() if not k.endswith("alpha")}, float(same["n.alpha"])
    )
    back = split_fused("n", adapter, QKV, [6, 6, 6])
    assert back[("denoiser", "q")].rank == 2 and back[("denoiser", "q")].alpha == 4.0  # split_qkv parts


def test_swapped_halves_and_final_layer_scale_folded() -> None:
    """diffusers' kohya-Flux reader ignores final_layer alphas: the scale goes into up, alpha = rank."""
    g = torch.Generator().manual_seed(1)
    down, up = torch.randn(2, 4, generator=g), torch.randn(8, 2, generator=g)
    layer = FusedLayer("denoiser", ("norm_out.linear",), swap_halves=True)
    out = fuse_lora("lora_unet_final_layer_adaLN_modulation_1", layer, [8], {0: (down, up, 1.0)})
    assert float(out["lora_unet_final_layer_adaLN_modulation_1.alpha"]) == 2.0
    written = out["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"]
    torch.testing.assert_close(written, 0.5 * torch.cat([up[4:], up[:4]]))
