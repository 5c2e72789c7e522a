"""Each layer kind gets the alpha its config names, injected and in the file, for every type with an alpha.

Round-trip tests reuse whatever alpha was injected, so a conv layer wrongly given ``linear_alpha`` would
survive them; here the expected values come from the config alone. Ranks and alphas are all different
(linear 4 / 2, conv 2 / 3), so swapping any two of them changes a number the test checks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch import nn

from eridiffusion.config.schema import NetworkConfig
from eridiffusion.models import build_family
from eridiffusion.networks import attach_network, export_network
from eridiffusion.networks.adapters import ADAPTER
from tests.conftest import TINY_OPTIONS

LINEAR_RANK, LINEAR_ALPHA, CONV_RANK, CONV_ALPHA = 4, 2.0, 2, 3.0


def _base_kind(layer: BaseTunerLayer) -> str:
    """'conv' for k>1 convolutions (the ``conv`` / ``conv_alpha`` settings), else 'linear' (incl. 1x1)."""
    base = layer.get_base_layer()
    if isinstance(base, nn.Conv2d) and base.kernel_size != (1, 1):
        return "conv"
    return "linear"


@pytest.mark.parametrize("kind", ["lora", "dora", "loha", "lokr"])
def test_linear_and_conv_layers_get_their_own_alpha(kind: str, tmp_path: Path) -> None:
    cfg = NetworkConfig(
        type=kind, linear=LINEAR_RANK, linear_alpha=LINEAR_ALPHA, conv=CONV_RANK, conv_alpha=CONV_ALPHA
    )
    expected = {"linear": (LINEAR_RANK, LINEAR_ALPHA), "conv": (CONV_RANK, CONV_ALPHA)}
    family = build_family("tiny", TINY_OPTIONS, seed=0)
    attach_network(family, cfg, train_text_encoder=True)

    file_alpha_wanted: dict[str, float] = {}
    seen = {"linear": 0, "conv": 0}
    for component, module in family.modules().items():
        for path, layer in module.named_modules():
            if not isinstance(layer, BaseTunerLayer) or ADAPTER not in layer.r:
                continue
            layer_kind = _base_kind(layer)
            rank, alpha = expected[layer_kind]
            seen[layer_kind] += 1
            assert layer.r[ADAPTER] == rank, f"{component}.{path} ({layer_kind}) rank"
            assert layer.scaling[ADAPTER] == pytest.approx(alpha / rank), (
                f"{component}.{path} ({layer_kind}) is scaled by {layer.scaling[ADAPTER]}, "
                f"config says {alpha}/{rank}"
            )
            file_alpha_wanted[family.lora_key_names(component, path)[0]] = alpha
    assert seen["linear"] and seen["conv"], f"the tiny model must have both layer kinds adapted: {seen}"

    path = export_network(family, cfg, tmp_path / "a.safetensors", "kohya", "fp32", {})
    tensors = load_file(path)
    for base, alpha in file_alpha_wanted.items():
        assert tensors[f"{base}.alpha"].item() == pytest.approx(alpha), f"{base}.alpha in the file"
    assert len(file_alpha_wanted) == sum(1 for k in tensors if k.endswith(".alpha"))


def test_conv_alpha_defaults_to_conv_rank() -> None:
    """``conv_alpha: null`` means alpha = conv rank (scale 1), not the linear alpha."""
    cfg = NetworkConfig(type="lora", linear=4, linear_alpha=8.0, conv=2)
    family = build_family("tiny", TINY_OPTIONS, seed=0)
    attach_network(family, cfg, train_text_encoder=False)
    convs = [
        layer
        for layer in family.unet.modules()
        if isinstance(layer, BaseTunerLayer) and _base_kind(layer) == "conv"
    ]
    assert convs
    assert all(layer.scaling[ADAPTER] == pytest.approx(1.0) for layer in convs)
