"""SDXL micro-conditioning from the data: the loader records each image's original size and crop offset
(centre, random, flipped; cached latents alike), and SDXL turns them into the UNet's six time ids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from eridiffusion.config import load_config
from eridiffusion.config.schema import DatasetConfig
from eridiffusion.data.cache import prepare_caches
from eridiffusion.data.folder import cover_resize, to_uint8_tensor
from eridiffusion.data.loader import Batch, TrainingData
from eridiffusion.models import build_family
from eridiffusion.models.sdxl import SDXLFamily
from eridiffusion.training.loop import diffusion_loss, trainable_parameters
from tests.conftest import tiny_job, write_yaml
from tests.unit.imagesets import _noise

CPU = torch.device("cpu")
SIZE_MULTIPLE = 16  # tiny SDXL: VAE factor 8 x UNet factor 2
WIDE, TALL = (48, 40), (40, 48)
"""(width, height) of the two source images; at a 32 px square crop they cover-resize to 38x32 / 32x38."""


@pytest.fixture(scope="module")
def sdxl() -> SDXLFamily:
    family = build_family("sdxl", {"preset": "tiny"}, seed=0)
    assert isinstance(family, SDXLFamily)
    for module in family.modules().values():
        module.eval().requires_grad_(False)
    return family


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    root.mkdir()
    for i, (w, h) in enumerate((WIDE, TALL)):
        _noise(w, h, seed=i).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"picture {i}", encoding="utf-8")
    return root


def _data(folder: Path, **options: Any) -> TrainingData:
    cfg = DatasetConfig(**{"folder_path": str(folder), "resolution": 32, "enable_buckets": False, **options})
    return TrainingData([cfg], batch_size=2, seed=0, size_multiple=SIZE_MULTIPLE)


def _rows(data: TrainingData, k: int) -> list[tuple[Any, ...]]:
    """(source size, flipped, (orig h, orig w, top, left), pixels) per image of micro-batch k."""
    batch = data.batch(k)
    assert batch.original_sizes is not None and batch.crops is not None
    epoch, b = data.position(k)
    ids = data.plan(epoch)[b]
    return [
        (
            data.sources[0].sizes[data.views[v].item],
            data.flips(v, epoch),
            (*batch.original_sizes[j].tolist(), *batch.crops[j].tolist()),
            batch.pixels[j] if batch.pixels is not None else None,
        )
        for j, v in enumerate(ids)
    ]


def _crop_of_source(folder: Path, size: tuple[int, int], top: int, left: int, flip: bool) -> torch.Tensor:
    """The 32x32 crop at (top, left) of the cover-resized source, itself mirrored first when flipped: what
    the recorded offsets claim the model was shown."""
    name = "img0.png" if size == WIDE else "img1.png"
    resized = to_uint8_tensor(cover_resize(Image.open(folder / name).convert("RGB"), 32, 32))
    if flip:
        resized = resized.flip(-1)
    return resized[:, top : top + 32, left : left + 32].float().div(127.5).sub(1.0)


def test_centre_crop_records_original_size_and_offsets(folder: Path) -> None:
    data = _data(folder)
    rows = _rows(data, 0)
    seen = {size: geometry for size, _, geometry, _ in rows}
    # 48x40 -> 38x32, centred: left (38 - 32) // 2 = 3; 40x48 -> 32x38: top 3
    assert seen == {WIDE: (40, 48, 0, 3), TALL: (48, 40, 3, 0)}
    for size, flip, (_, _, top, left), pixels in rows:
        torch.testing.assert_close(pixels, _crop_of_source(folder, size, top, left, flip))


def test_random_crops_and_flips_record_where_the_crop_lies(folder: Path) -> None:
    data = _data(folder, crop="random", flip_x=True)
    lefts: set[int] = set()
    flipped = 0
    for k in range(12):  # 12 epochs of one batch each
        for size, flip, (orig_h, orig_w, top, left), pixels in _rows(data, k):
            assert (orig_w, orig_h) == size
            if size == WIDE:
                assert top == 0 and 0 <= left <= 6
                lefts.add(left)
            else:
                assert left == 0 and 0 <= top <= 6
            flipped += flip
            # the offsets locate the shown pixels in the (mirrored, when flipped) resized image
            torch.testing.assert_close(pixels, _crop_of_source(folder, size, top, left, flip))
    assert len(lefts) > 2 and 0 < flipped < 24


def test_flip_mirrors_the_left_offset_like_kohya(folder: Path) -> None:
    data = _data(folder, crop="random", flip_x=True)
    v = next(v for v in range(len(data.views)) if data.sources[0].sizes[data.views[v].item] == WIDE)
    for epoch in range(6):
        _, _, top, left = data.size_and_crop(v, epoch, flip=False)
        assert data.size_and_crop(v, epoch, flip=True) == (40, 48, top, 38 - left - 32)


def test_sdxl_time_ids_from_a_batch(sdxl: SDXLFamily, folder: Path) -> None:
    batch = _data(folder).batch(0)
    size_cond = batch.size_conditioning()
    assert size_cond is not None
    noisy = torch.zeros((len(batch), *sdxl.latent_shape(32, 32)))
    pooled = torch.zeros((len(batch), 8))
    ids = sdxl.added_cond(noisy, {"pooled": pooled, "size_conditioning": size_cond})["time_ids"]
    expected = torch.tensor(
        [[40, 48, 0, 3, 32, 32] if h == 40 else [48, 40, 3, 0, 32, 32] for h in batch.original_sizes[:, 0]],
        dtype=torch.float32,
    )
    torch.testing.assert_close(ids, expected, rtol=0, atol=0)
    # without the metadata: today's default (generated size, no crop), as at inference
    default = sdxl.added_cond(noisy, {"pooled": pooled})["time_ids"]
    assert default.tolist() == [[32, 32, 0, 0, 32, 32]] * len(batch)


def test_cached_latent_batches_carry_the_same_geometry(sdxl: SDXLFamily, folder: Path) -> None:
    plain = _data(folder, flip_x=True)
    cached = _data(folder, flip_x=True, cache_latents_to_disk=True)
    prepare_caches(cached, sdxl, CPU, progress=False)
    for k in range(6):
        a, b = plain.batch(k), cached.batch(k)
        assert b.latents is not None and b.pixels is None
        assert a.captions == b.captions
        assert a.original_sizes is not None and b.original_sizes is not None
        assert a.crops is not None and b.crops is not None
        assert torch.equal(a.original_sizes, b.original_sizes) and torch.equal(a.crops, b.crops)


def test_tiny_sdxl_training_step_uses_the_data_geometry(tmp_path: Path, folder: Path) -> None:
    job = tiny_job(tmp_path, name="sdxl", model={"arch": "sdxl", "options": {"preset": "tiny"}})
    job["train"] = {"steps": 1, "batch_size": 2, "lr": 1e-3, "seed": 3, "train_text_encoder": False}
    job["datasets"] = [
        {"folder_path": str(folder), "resolution": 32, "enable_buckets": False, "flip_x": True}
    ]
    cfg = load_config(write_yaml(tmp_path / "job.yaml", job))
    family = build_family("sdxl", {"preset": "tiny"}, seed=0)
    assert isinstance(family, SDXLFamily)
    params = trainable_parameters(family, cfg)
    data = TrainingData(cfg.datasets, 2, 3, family.size_multiple())
    batch: Batch = data.batch(0)
    seen: list[torch.Tensor] = []
    original = family.added_cond

    def spy(noisy: torch.Tensor, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = original(noisy, cond)
        seen.append(out["time_ids"])
        return out

    family.added_cond = spy  # type: ignore[method-assign]
    loss = diffusion_loss(family, batch, cfg, torch.Generator().manual_seed(0), CPU)
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    assert batch.original_sizes is not None and batch.crops is not None
    expected = torch.cat(
        [batch.original_sizes, batch.crops, torch.tensor([[32, 32]]).expand(len(batch), 2)], dim=1
    ).float()
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)
