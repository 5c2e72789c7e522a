"""``model.options.pooled_text``: the attention-pooled prompt joins the timestep embedding of the tiny UNet.

The quickstart's held-out colour x shape pairs depend on it (bench/RESULTS.md, quickstart trials): colour is a
property of the whole image, and without this path the prompt reaches only the levels with cross-attention.
"""

from __future__ import annotations

from pathlib import Path

import torch

from eridiffusion.models import build_family, load_family
from eridiffusion.models.tiny import parse_options
from tests.conftest import TINY_OPTIONS

NO_CROSS_ATTENTION = {**TINY_OPTIONS, "attention_levels": [False, False]}


def _prediction_spread(pooled: bool) -> float:
    """How far apart two prompts' predictions are for the same noisy latents and timestep."""
    fam = build_family("tiny", {**NO_CROSS_ATTENTION, "pooled_text": pooled}, seed=0)
    for m in fam.modules().values():
        m.eval()
    shape = fam.latent_shape(16, 16)
    noisy = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0)).repeat(2, 1, 1, 1)
    cond = fam.encode_prompt(["a red circle", "a blue square"])
    with torch.no_grad():
        out = fam.predict(noisy, torch.tensor([500, 500]), cond)
    return float((out[0] - out[1]).abs().max())


def test_pooled_text_conditions_a_unet_without_cross_attention() -> None:
    assert _prediction_spread(pooled=False) == 0.0  # nothing carries the prompt: the control
    assert _prediction_spread(pooled=True) > 1e-4


def test_pooled_text_defaults_off_so_older_models_keep_their_architecture() -> None:
    assert parse_options(dict(TINY_OPTIONS)).pooled_text is False
    fam = build_family("tiny", dict(TINY_OPTIONS), seed=0)
    assert fam.unet.config.addition_embed_type is None


def test_pooled_text_survives_save_and_load(tmp_path: Path) -> None:
    fam = build_family("tiny", {**TINY_OPTIONS, "pooled_text": True}, seed=0)
    fam.save_pretrained(tmp_path / "m")
    loaded = load_family(tmp_path / "m")
    assert loaded.options.pooled_text is True
    assert loaded.unet.config.addition_embed_type == "text"
    names = {name for name, _ in loaded.unet.named_parameters()}
    assert any(name.startswith("add_embedding.pool.") for name in names)
