"""Loss masks on the data side: found beside images or in mask_path (never trained as images), carried
through buckets, crops and flips pixel for pixel, cached with latents (and invalidated by a changed mask),
and refused clearly when unreadable or misshapen."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eridiffusion.config import load_config
from eridiffusion.config.aitoolkit import TranslationError, translate
from eridiffusion.config.schema import DatasetConfig
from eridiffusion.data.cache import prepare_caches
from eridiffusion.data.folder import DatasetError, scan_folder
from eridiffusion.data.loader import TrainingData
from eridiffusion.data.masks import mask_notes, mask_weights, resize_loss_mask
from eridiffusion.models import build_family
from tests.conftest import TINY_OPTIONS, tiny_job, write_yaml

CPU = torch.device("cpu")


def _ramp(width: int, height: int) -> np.ndarray:
    """Rising to the right and downwards, 2 levels a pixel (sizes up to 60 x 60): a crop one pixel off in
    either direction, or a missed flip, changes every value."""
    y, x = np.mgrid[0:height, 0:width]
    return (x * 2 + y * 2 + 10).astype(np.uint8)


def _write(folder: Path, name: str, size: tuple[int, int], mask: bool = True) -> None:
    """An image whose red channel equals its mask, so the mask must follow exactly what the image does."""
    folder.mkdir(parents=True, exist_ok=True)
    ramp = _ramp(*size)
    rgb = np.stack([ramp, 255 - ramp, np.full_like(ramp, 60)], axis=-1)
    Image.fromarray(rgb, "RGB").save(folder / f"{name}.png")
    (folder / f"{name}.txt").write_text(f"photo of {name}")
    if mask:
        Image.fromarray(ramp, "L").save(folder / f"{name}_mask.png")


def _data(folder: Path, batch_size: int = 4, **options: object) -> TrainingData:
    cfg = DatasetConfig(**{"folder_path": str(folder), "resolution": 16, **options})
    return TrainingData([cfg], batch_size=batch_size, seed=0, size_multiple=4)


def test_beside_masks_are_paired_and_never_trained_as_images(tmp_path: Path) -> None:
    _write(tmp_path, "a", (32, 16))
    _write(tmp_path, "b", (16, 32), mask=False)
    Image.new("L", (20, 20), 255).save(tmp_path / "face_mask.png")  # no face.png: an ordinary image
    scan = scan_folder(tmp_path)
    names = sorted(p.name for p, _ in scan.items)
    assert names == ["a.png", "b.png", "face_mask.png"]
    assert {k.name: v.name for k, v in scan.masks.items()} == {"a.png": "a_mask.png"}
    data = _data(tmp_path)
    assert "loss masks: 1 of 3 images" in data.report()


def test_mask_follows_bucket_resize_random_crop_and_flip(tmp_path: Path) -> None:
    """The red channel of every served crop is the mask (both ramps resized alike), at every crop and flip."""
    _write(tmp_path, "wide", (60, 20))  # resized to 48x16, then cropped
    _write(tmp_path, "tall", (20, 50))
    data = _data(tmp_path, crop="random", flip_x=True, enable_buckets=False)
    seen_flips = set()
    for epoch in range(6):
        for v in range(len(data.views)):
            flip = data.flips(v, epoch)
            seen_flips.add(flip)
            pixels = data.view_pixels(v, epoch, flip)
            mask = data.view_mask(v, epoch, flip)
            assert mask.shape == (1, 16, 16)
            # LANCZOS (image) and BILINEAR (mask) resize a ramp alike up to rounding; one pixel off in
            # either direction moves it by 1.6 levels (2 per source pixel, resized by 0.8)
            red, m = pixels[0].float(), mask[0].float()
            assert (red - m).abs().mean() < 0.5, (epoch, v, flip)
            assert (red[:, 1:] - m[:, :-1]).abs().mean() > 1.2
            assert (red[1:, :] - m[:-1, :]).abs().mean() > 1.2
    assert seen_flips == {False, True}


def test_mask_folder_by_name_and_kohya_alias(tmp_path: Path) -> None:
    _write(tmp_path / "imgs", "a", (32, 16), mask=False)
    _write(tmp_path / "imgs", "b", (16, 32), mask=False)
    (tmp_path / "masks").mkdir()
    Image.fromarray(_ramp(32, 16), "L").save(tmp_path / "masks" / "a.png")
    data = _data(tmp_path / "imgs", mask_path=str(tmp_path / "masks"))
    assert [f.name if f else None for f in data.masks.files[0]] == ["a.png", None]
    job = tiny_job(tmp_path)
    job["datasets"] = [
        {"folder_path": str(tmp_path / "imgs"), "conditioning_data_dir": "m", "mask_min_value": 0.2}
    ]
    notes: list[str] = []
    d = load_config(write_yaml(tmp_path / "job.yaml", job), notes=notes).datasets[0]
    assert (d.mask_path, d.unmasked_weight) == ("m", 0.2)
    assert "  datasets[0].conditioning_data_dir -> datasets[0].mask_path = 'm'" in notes
    with pytest.raises(DatasetError, match=r"datasets\[0\]\.mask_path: no file in .* is named like"):
        _data(tmp_path / "imgs", mask_path=str(tmp_path / "imgs" / ".."))
    with pytest.raises(DatasetError, match=r"datasets\[0\]\.mask_path: .* is not a folder"):
        _data(tmp_path / "imgs", mask_path=str(tmp_path / "nowhere"))


def test_unreadable_or_misshapen_mask_is_an_error_naming_the_file(tmp_path: Path) -> None:
    _write(tmp_path, "a", (32, 16), mask=False)
    (tmp_path / "a_mask.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(DatasetError, match=r"datasets\[0\]: cannot read loss mask '.*a_mask\.png'"):
        _data(tmp_path)
    Image.new("L", (16, 16), 255).save(tmp_path / "a_mask.png")
    with pytest.raises(DatasetError, match=r"a_mask\.png' is 16x16 px but its image is 32x16"):
        _data(tmp_path)
    Image.new("L", (64, 32), 255).save(tmp_path / "a_mask.png")  # same shape, larger: resized
    data = _data(tmp_path)
    assert data.view_mask(0, None, False).shape[1:] == data.view_pixels(0, None, False).shape[1:]


def test_weights_map_black_to_unmasked_weight_and_normalise() -> None:
    coverage = torch.tensor([[[0.0, 0.5, 1.0, 1.0]]])
    torch.testing.assert_close(mask_weights(coverage, 0.2, False), torch.tensor([[[0.2, 0.6, 1.0, 1.0]]]))
    assert mask_weights(torch.ones(1, 2, 2), 0.3, False).eq(1).all()  # no mask pixel is exactly 1
    normal = mask_weights(coverage, 0.0, True)
    assert float(normal.mean()) == pytest.approx(1.0)
    assert mask_weights(torch.zeros(1, 2, 2), 0.0, True).eq(0).all()  # nothing to normalise
    pixel = torch.arange(16.0).reshape(1, 1, 4, 4)
    torch.testing.assert_close(resize_loss_mask(pixel, (2, 2)), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))


def _family():  # noqa: ANN202
    family = build_family("tiny", TINY_OPTIONS, seed=0)
    for module in family.modules().values():
        module.eval().requires_grad_(False)
    return family


def test_cached_masks_equal_uncached_and_a_changed_mask_is_recomputed(tmp_path: Path, caplog) -> None:
    for i, size in enumerate([(32, 16), (16, 32), (24, 24), (40, 20)]):
        _write(tmp_path, f"img{i}", size, mask=i != 3)
    family = _family()
    options = {"flip_x": True, "unmasked_weight": 0.25, "normalize_masked_area_loss": True}
    plain = _data(tmp_path, batch_size=2, **options)
    cached = _data(tmp_path, batch_size=2, cache_latents_to_disk=True, **options)
    prepare_caches(cached, family, CPU, progress=False)
    masks = sorted((tmp_path / ".eri_cache" / "masks").rglob("*.safetensors"))
    assert len(masks) == 6  # 3 masked images x (plain, flipped)
    compared = 0
    for k in range(plain.batches_per_epoch * 2):
        a, b = plain.batch(k), cached.batch(k)
        assert a.captions == b.captions
        if a.loss_mask is None:
            assert b.loss_mask is None
            continue
        compared += 1
        latent_size = tuple(b.latents.shape[-2:])
        assert tuple(b.loss_mask.shape[-2:]) == latent_size
        assert torch.equal(resize_loss_mask(a.loss_mask, latent_size), b.loss_mask)
    assert compared >= 2

    Image.fromarray(255 - _ramp(32, 16), "L").save(tmp_path / "img0_mask.png")  # same name, new content
    again = _data(tmp_path, batch_size=2, cache_latents_to_disk=True, **options)
    with caplog.at_level(logging.INFO):
        prepare_caches(again, family, CPU, progress=False)
    assert "latent cache: 0 computed, 8 reused" in caplog.text  # the latents did not change
    assert len(list((tmp_path / ".eri_cache" / "masks").rglob("*.safetensors"))) == 8
    v = next(v for v, view in enumerate(again.views) if view.item == 0)
    before, after = cached.mask_lookup[(v, False)], again.mask_lookup[(v, False)]
    assert isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)  # small: held in memory
    coverage = again.view_mask(v, None, False).float() / 255
    size = tuple(after.shape[-2:])
    assert torch.equal(after, resize_loss_mask(mask_weights(coverage, 0.25, True), size))
    assert not torch.equal(before, after)


def test_aitoolkit_mask_keys_translate_and_alpha_masks_are_refused() -> None:
    job = {
        "job": "extension",
        "config": {
            "name": "masked",
            "process": [
                {
                    "type": "sd_trainer",
                    "datasets": [{"folder_path": "imgs", "mask_path": "masks", "mask_min_value": 0.1}],
                }
            ],
        },
    }
    out, notes, foreign = translate(job)
    assert foreign and out["datasets"] == [
        {"folder_path": "imgs", "mask_path": "masks", "unmasked_weight": 0.1}
    ]
    assert "config.process[0].datasets[0].mask_min_value -> datasets[0].unmasked_weight = 0.1" in notes
    job["config"]["process"][0]["datasets"][0].update(invert_mask=True)
    with pytest.raises(TranslationError, match=r"invert_mask: no equivalent; invert the mask images"):
        translate(job)


def test_alpha_channel_as_mask(tmp_path: Path) -> None:
    ramp = _ramp(40, 20)
    black = np.zeros_like(ramp)
    rgba = np.stack([black, black, black, ramp], axis=-1)  # over white: every channel is 255 - alpha
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cut.png")
    Image.fromarray(np.stack([ramp] * 3, axis=-1), "RGB").save(tmp_path / "opaque.png")
    data = _data(tmp_path, alpha_mask=True, enable_buckets=False, crop="random")
    assert [f.name if f else None for f in data.masks.files[0]] == ["cut.png", None]
    v = next(v for v, view in enumerate(data.views) if view.item == 0)
    for epoch in range(3):
        mask = data.view_mask(v, epoch, flip=True)[0].float()
        image = data.view_pixels(v, epoch, flip=True)[0].float()
        assert (255 - image - mask).abs().mean() < 0.5
    assert mask_notes(data.configs) == ["  datasets[0]: loss masks on 1 of 2 images"]
    with pytest.raises(ValueError, match="set one of mask_path"):
        DatasetConfig(folder_path="x", alpha_mask=True, mask_path="m")
