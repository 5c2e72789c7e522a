"""The contract every model family passes (parametrised over families as they land)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eridiffusion.config.schema import NetworkConfig
from eridiffusion.inference.generate import GenerateRequest, sample
from eridiffusion.inference.samplers import SAMPLERS, compatible_samplers
from eridiffusion.models import ModelFamily, build_family, load_family
from eridiffusion.networks import (
    apply_adapter,
    attach_network,
    export_network,
    merge_adapters,
    read_adapter_file,
)
from tests.conftest import TINY_OPTIONS

FAMILIES = {
    "tiny": lambda: build_family("tiny", TINY_OPTIONS, seed=0),
    "tiny_pooled_text": lambda: build_family("tiny", {**TINY_OPTIONS, "pooled_text": True}, seed=0),
    "sd15": lambda: build_family("sd15", {"preset": "tiny"}, seed=0),
    "sdxl": lambda: build_family("sdxl", {"preset": "tiny"}, seed=0),
    "sd3": lambda: build_family("sd3", {"preset": "tiny"}, seed=0),
    "flux_dev": lambda: build_family("flux", {"preset": "tiny"}, seed=0),
    "flux_schnell": lambda: build_family("flux", {"preset": "tiny_schnell"}, seed=0),
}
LOSSLESS_LATENTS = {"tiny"}
"""Families whose encode/decode is exact (pixel packing); the others use a (here random) autoencoder."""


@pytest.fixture(params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> ModelFamily:
    fam = FAMILIES[request.param]()
    for m in fam.modules().values():
        m.eval()
    return fam


def _fixed_batch(family: ModelFamily) -> tuple[torch.Tensor, list[str]]:
    size = family.default_resolution()
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand((4, 3, size, size), generator=g) * 2 - 1
    return pixels, ["a red circle", "a blue square", "a green triangle", ""]


def test_is_a_model_family(family: ModelFamily) -> None:
    assert isinstance(family, ModelFamily)
    assert set(family.trainable_modules(True)) <= set(family.modules())
    assert "text_encoder" not in family.trainable_modules(False)


def test_latent_round_trip_and_shapes(family: ModelFamily) -> None:
    pixels, prompts = _fixed_batch(family)
    latents = family.encode_images(pixels)
    size = family.default_resolution()
    assert tuple(latents.shape[1:]) == family.latent_shape(size, size)
    decoded = family.decode_latents(latents)
    assert decoded.shape == pixels.shape and torch.isfinite(decoded).all()
    if family.arch in LOSSLESS_LATENTS:
        torch.testing.assert_close(decoded, pixels)
    cond = family.encode_prompt(prompts)
    t = torch.full((4,), 500)
    assert family.predict(latents, t, cond).shape == latents.shape


def test_save_load_round_trip_gives_same_outputs(family: ModelFamily, tmp_path: Path) -> None:
    pixels, prompts = _fixed_batch(family)
    latents, t = family.encode_images(pixels), torch.tensor([10, 200, 600, 999])
    with torch.no_grad():
        before = family.predict(latents, t, family.encode_prompt(prompts))
    family.save_pretrained(tmp_path / "m")
    loaded = load_family(tmp_path / "m")
    for m in loaded.modules().values():
        m.eval()
    with torch.no_grad():
        after = loaded.predict(latents, t, loaded.encode_prompt(prompts))
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    assert loaded.objective.scheduler_config() == family.objective.scheduler_config()


def test_full_fine_tune_steps_lower_loss_on_a_fixed_batch(family: ModelFamily) -> None:
    pixels, prompts = _fixed_batch(family)
    params = [p for m in family.trainable_modules(True).values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x0 = family.encode_images(pixels)
    noise = torch.randn(x0.shape, generator=g)
    t = family.objective.sample_timesteps(4, g)
    target = family.objective.make_target(x0, noise, t)

    def loss() -> torch.Tensor:
        pred = family.predict(target.noisy, t, family.encode_prompt(prompts))
        return torch.nn.functional.mse_loss(pred, target.target)

    first = loss()
    for _ in range(5):
        opt.zero_grad()
        current = loss()
        current.backward()
        opt.step()
    assert loss().item() < 0.9 * first.item()


def test_every_family_has_a_sampler(family: ModelFamily) -> None:
    assert compatible_samplers(family.objective.prediction_type)


@pytest.mark.parametrize("sampler", [k for k in SAMPLERS if k != "dpmpp_2m_karras"])
def test_generate_is_finite_sized_and_seeded(family: ModelFamily, sampler: str) -> None:
    """Every sampler valid for the family's objective generates; the others are refused up front."""
    req = GenerateRequest(prompts=["a red circle"], steps=4, sampler=sampler, seed=5, images_per_prompt=2)
    if sampler not in compatible_samplers(family.objective.prediction_type):
        with pytest.raises(ValueError, match=rf"sampler '{sampler}' \(.+\) is for .+; use one of: "):
            sample(family, req, torch.device("cpu"))
        return
    a = sample(family, req, torch.device("cpu"))
    size = family.default_resolution()
    assert a.shape == (2, 3, size, size)
    assert torch.isfinite(a).all() and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, sample(family, req, torch.device("cpu")), rtol=0, atol=0)
    assert not torch.equal(a[0], a[1])  # seed, seed+1 differ


def test_karras_on_cosine_schedule_is_refused_clearly() -> None:
    """Karras sigmas collapse onto repeated timesteps when sigma_max is huge (cosine): a clear error."""
    family = build_family("tiny", {**TINY_OPTIONS, "beta_schedule": "cosine"}, seed=0)
    req = GenerateRequest(prompts=["x"], steps=10, sampler="DPM++ 2M Karras")
    with pytest.raises(ValueError, match="repeated timesteps"):
        sample(family, req, torch.device("cpu"))


NETWORK_KINDS = {
    "lora": {"type": "lora", "linear": 4, "linear_alpha": 2, "conv": 2},
    "dora": {"type": "dora", "linear": 4, "linear_alpha": 4},
    "loha": {"type": "loha", "linear": 4, "linear_alpha": 2},
    "lokr": {"type": "lokr", "linear": 4, "linear_alpha": 2},
}


def _outputs(family: ModelFamily) -> torch.Tensor:
    pixels, prompts = _fixed_batch(family)
    with torch.no_grad():
        latents = family.encode_images(pixels)
        return family.predict(latents, torch.tensor([10, 200, 600, 999]), family.encode_prompt(prompts))


@pytest.mark.parametrize("kind", sorted(NETWORK_KINDS))
def test_adapter_file_round_trip(
    family: ModelFamily, kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Train-side adapters -> kohya file -> (a) merged into a fresh model, (b) loaded to continue training,
    (c) baked in with merge_adapters: all three reproduce the adapter model's outputs."""
    fresh = FAMILIES[request.node.callspec.params["family"]]
    cfg = NetworkConfig(**NETWORK_KINDS[kind])
    params = attach_network(family, cfg, train_text_encoder=True, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(
                p * (1 + 0.1 * torch.rand(p.shape, generator=g))
                if "magnitude" in name
                else torch.randn(p.shape, generator=g) * 0.05
            )
    for m in family.modules().values():
        m.eval()
    expected = _outputs(family)
    path = export_network(family, cfg, tmp_path / "a.safetensors", "kohya", "fp32", {})

    merged = fresh()
    for m in merged.modules().values():
        m.eval()
    apply_adapter(merged, read_adapter_file(path, merged), 1.0)
    torch.testing.assert_close(_outputs(merged), expected, atol=5e-5, rtol=1e-3)

    resumed = fresh()
    attach_network(resumed, cfg.model_copy(update={"init_from": str(path)}), train_text_encoder=True)
    for m in resumed.modules().values():
        m.eval()
    torch.testing.assert_close(_outputs(resumed), expected, atol=5e-5, rtol=1e-3)

    merge_adapters(family)
    torch.testing.assert_close(_outputs(family), expected, atol=5e-5, rtol=1e-3)
