"""The shared Generator API: seeds, LoRA without touching the cached base, LRU cache, progress/cancel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from eridiffusion.config.schema import NetworkConfig
from eridiffusion.inference.generate import GenerateRequest, sample
from eridiffusion.inference.generator import Generator, UnknownName, discover_models
from eridiffusion.models import build_family
from eridiffusion.networks import attach_network, export_network
from tests.conftest import TINY_OPTIONS


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with two tiny models and a LoRA (random, non-zero) for the first."""
    root = tmp_path_factory.mktemp("models")
    for seed, name in ((0, "a"), (1, "b")):
        build_family("tiny", TINY_OPTIONS, seed=seed).save_pretrained(root / "models" / name)
    family = build_family("tiny", TINY_OPTIONS, seed=0)
    cfg = NetworkConfig(type="lora", linear=4, linear_alpha=4)
    params = attach_network(family, cfg, train_text_encoder=False, seed=0)
    with torch.no_grad():
        for p in params.values():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    (root / "loras").mkdir()
    export_network(family, cfg, root / "loras" / "style.safetensors", "kohya", "fp32", {})
    return root


def _pixels(gen: Generator, req: GenerateRequest, **kw: object) -> np.ndarray:
    return np.stack([np.asarray(i) for i in gen.generate(req, **kw).images])


def _req(seed: int = 5, prompt: str = "a red circle", n: int = 1) -> GenerateRequest:
    return GenerateRequest(prompts=[prompt], steps=2, sampler="", seed=seed, images_per_prompt=n)


def test_discover_models_names_folders(models: Path) -> None:
    assert sorted(discover_models([models / "models"])) == ["a", "b"]
    assert list(discover_models([models / "models" / "b"])) == ["b"]
    with pytest.raises(ValueError, match="no model"):
        discover_models([models / "loras"])


def test_seed_reproduces_image_alone_and_in_batch(models: Path) -> None:
    gen = Generator(discover_models([models / "models"]), device="cpu")
    batch = gen.generate(_req(seed=7, n=2))
    assert batch.seeds == [7, 8]
    assert "Seed: 8" in batch.parameters[1] and "Model: a" in batch.parameters[1]
    alone = _pixels(gen, _req(seed=8))
    assert np.array_equal(alone[0], np.asarray(batch.images[1]))


def test_lora_applies_without_corrupting_cached_base(models: Path) -> None:
    gen = Generator(discover_models([models / "models"]), device="cpu", lora_dirs=[models / "loras"])
    before = _pixels(gen, _req())
    with_lora = _pixels(gen, _req(), loras=[("style", 1.0)])
    tagged = _pixels(gen, _req(prompt="a red circle <lora:style:1>"))
    after = _pixels(gen, _req())
    assert np.abs(with_lora.astype(int) - before).max() > 0
    assert np.array_equal(tagged, with_lora)  # prompt tag == explicit LoRA, tag removed from the prompt
    assert np.array_equal(before, after)
    with pytest.raises(FileNotFoundError, match="nope"):
        gen.generate(_req(), loras=[("nope", 1.0)])


def test_cache_evicts_least_recently_used(models: Path) -> None:
    gen = Generator(discover_models([models / "models"]), device="cpu", max_models=1)
    gen.generate(_req(), model="a")
    gen.generate(_req(), model="b")
    assert [Path(k[0]).name for k in gen.cache.loaded()] == ["b"]
    one = gen.cache.total_bytes
    budget = Generator(
        discover_models([models / "models"]), device="cpu", memory_budget_bytes=one, max_models=5
    )
    budget.generate(_req(), model="a")
    budget.generate(_req(), model="b")
    assert len(budget.cache.loaded()) == 1 and budget.cache.total_bytes <= one
    with pytest.raises(UnknownName, match="unknown model 'zzz'"):
        gen.generate(_req(), model="zzz")


def test_progress_callback_and_cancel(models: Path) -> None:
    gen = Generator(discover_models([models / "models"]), device="cpu")
    seen: list[tuple[int, int]] = []
    gen.generate(_req(), on_step=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 2), (2, 2)]

    def stop(i: int, n: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gen.generate(_req(), on_step=stop)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "euler", "euler_a", "heun", "dpmpp_2m_karras", "unipc"])
def test_inpaint_keeps_the_unmasked_area_exactly(sampler: str) -> None:
    """tiny's latents are packed pixels, so the kept half must come back bit-exact for every sampler."""
    family = build_family("tiny", TINY_OPTIONS, seed=0)
    init = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(1, 16, 16)
    mask[:, :, :8] = 1
    req = GenerateRequest(
        ["a red circle"], steps=4, sampler=sampler, init_image=init, mask=mask, strength=1.0
    )
    out = sample(family, req)
    assert torch.allclose(out[0, :, :, 8:], init[:, :, 8:], atol=1e-5)
    assert (out[0, :, :, :8] - init[:, :, :8]).abs().mean() > 0.05


def test_img2img_on_a_flow_model_and_bad_inputs() -> None:
    family = build_family("flux", {"preset": "tiny"}, seed=0)
    size = family.default_resolution()
    init = torch.zeros(3, size, size)
    req = GenerateRequest(["a"], steps=4, sampler="flow_euler", init_image=init, strength=0.5)
    assert sample(family, req).shape == (1, 3, size, size)
    with pytest.raises(ValueError, match="runs no step"):
        sample(family, GenerateRequest(["a"], steps=4, sampler="flow_euler", init_image=init, strength=0.1))
    with pytest.raises(ValueError, match="init image is"):
        sample(family, GenerateRequest(["a"], steps=4, sampler="flow_euler", init_image=init[:, :8]))
    with pytest.raises(ValueError, match="needs an init image"):
        sample(family, GenerateRequest(["a"], steps=4, sampler="flow_euler", mask=init[:1]))
