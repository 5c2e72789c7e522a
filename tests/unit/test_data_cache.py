"""Latent and text-embedding caches: written once, reused, invalidated by changed inputs or models, both
flips cached, caption dropout served from the cached empty prompt, trained text encoders refused."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from eridiffusion.config.schema import DatasetConfig
from eridiffusion.data.cache import EncoderOffload, prepare_caches
from eridiffusion.data.loader import TrainingData
from eridiffusion.models import build_family
from tests.conftest import TINY_OPTIONS
from tests.unit.imagesets import _noise, write_mixed_folder

CPU = torch.device("cpu")


def _family(seed: int = 0):  # noqa: ANN202
    family = build_family("tiny", TINY_OPTIONS, seed=seed)
    for module in family.modules().values():
        module.eval().requires_grad_(False)
    return family


def _data(folder: Path, **options: object) -> TrainingData:
    cfg = DatasetConfig(**{"folder_path": str(folder), "resolution": 16, **options})
    return TrainingData([cfg], batch_size=4, seed=0, size_multiple=4)


def _entries(folder: Path, kind: str) -> list[Path]:
    return sorted((folder / ".eri_cache" / kind).rglob("*.safetensors"))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    write_mixed_folder(tmp_path / "imgs", n=5, with_problems=False)
    return tmp_path / "imgs"


def test_latent_cache_matches_encoder_and_is_reused_and_invalidated(folder: Path, caplog) -> None:
    family = _family()
    data = _data(folder, cache_latents_to_disk=True, flip_x=True)
    with caplog.at_level(logging.INFO):
        prepare_caches(data, family, CPU, progress=False)
    assert "latent cache: 10 computed, 0 reused" in caplog.text  # 5 images x (plain, flipped)
    assert len(_entries(folder, "latents")) == 10
    for k in range(data.batches_per_epoch):
        batch = data.batch(k)
        assert batch.pixels is None and batch.latents is not None
        epoch, b = data.position(k)
        ids = data.plan(epoch)[b]
        pixels = (
            torch.stack([data.view_pixels(v, epoch, data.flips(v, epoch)) for v in ids]).float() / 127.5 - 1
        )
        torch.testing.assert_close(batch.latents, family.encode_images(pixels), rtol=0, atol=0)

    caplog.clear()
    again = _data(folder, cache_latents_to_disk=True, flip_x=True)
    with caplog.at_level(logging.INFO):
        prepare_caches(again, family, CPU, progress=False)
    assert "latent cache: 0 computed, 10 reused" in caplog.text

    _noise(32, 16, 999).save(folder / "img01.png")  # same name, new content
    caplog.clear()
    with caplog.at_level(logging.INFO):
        prepare_caches(_data(folder, cache_latents_to_disk=True, flip_x=True), family, CPU, progress=False)
    assert "latent cache: 2 computed, 8 reused" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):  # a new training size is a new entry too
        prepare_caches(
            _data(folder, cache_latents_to_disk=True, resolution=[8, 16]), family, CPU, progress=False
        )
    assert "latent cache: 5 computed, 5 reused" in caplog.text


def test_text_cache_serves_dropout_and_tracks_the_text_encoder(folder: Path, caplog) -> None:
    family = _family()
    data = _data(folder, cache_text_embeddings=True, caption_dropout_rate=0.5, trigger_word="ohwx")
    with caplog.at_level(logging.INFO):
        offload = prepare_caches(data, family, CPU, progress=False)
    assert "text cache: 6 computed, 0 reused" in caplog.text  # 5 captions + the empty prompt
    assert isinstance(offload, EncoderOffload) and offload.names == ["text_encoder"]
    batch = data.batch(0)
    assert batch.cond is not None and batch.pixels is not None
    with torch.no_grad():
        expected = family.encode_prompt(batch.captions)["context"]
        empty = family.encode_prompt([""])["context"][0]
    torch.testing.assert_close(batch.cond["context"], expected, rtol=1e-5, atol=1e-6)
    drop = torch.tensor([True] + [False] * (len(batch) - 1))
    mixed = batch.cached_conditioning(drop, CPU)["context"]
    torch.testing.assert_close(mixed[0], empty, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[1:], expected[1:], rtol=1e-5, atol=1e-6)
    assert all(c.startswith("ohwx, ") for c in batch.captions)

    caplog.clear()
    with caplog.at_level(logging.INFO):  # different text-encoder weights: nothing may be reused
        prepare_caches(_data(folder, cache_text_embeddings=True), _family(seed=1), CPU, progress=False)
    assert "text cache: 6 computed, 0 reused" in caplog.text


def test_trained_text_encoder_cannot_be_cached(folder: Path) -> None:
    family = _family()
    family.modules()["text_encoder"].requires_grad_(True)
    with pytest.raises(ValueError, match="train.train_text_encoder: false"):
        prepare_caches(_data(folder, cache_text_embeddings=True), family, CPU, progress=False)


def test_cached_and_uncached_batches_give_the_same_loss(folder: Path) -> None:
    from eridiffusion.config.schema import JobConfig
    from eridiffusion.training.loop import diffusion_loss
    from tests.conftest import tiny_job

    family = _family()
    cfg = JobConfig.model_validate(tiny_job(folder.parent))
    plain = _data(folder, caption_dropout_rate=0.5)
    cached = _data(folder, caption_dropout_rate=0.5, cache_latents_to_disk=True, cache_text_embeddings=True)
    prepare_caches(cached, family, CPU, progress=False)
    for k in range(plain.batches_per_epoch):
        gen_a, gen_b = torch.Generator().manual_seed(k), torch.Generator().manual_seed(k)
        with torch.no_grad():
            a = diffusion_loss(family, plain.batch(k), cfg, gen_a, CPU)
            b = diffusion_loss(family, cached.batch(k), cfg, gen_b, CPU)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
