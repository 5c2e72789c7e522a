"""Folder dataset: broken files are skipped with a reason, images come out upright, square and in [-1, 1]."""

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from eridiffusion.data.folder import (
    DatasetError,
    ImageCaptionDataset,
    load_rgb,
    resize_and_crop,
    scan_folder,
)

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _halves(width, height, left, right):
    """An image whose left half is one colour and right half another, so orientation is easy to check."""
    img = Image.new("RGB", (width, height), left)
    img.paste(Image.new("RGB", (width - width // 2, height), right), (width // 2, 0))
    return img


@pytest.fixture
def messy_folder(tmp_path):
    rng = np.random.default_rng(0)
    Image.new("RGB", (40, 30), (10, 200, 10)).save(tmp_path / "a_small.png")
    _halves(100, 50, RED, BLUE).save(tmp_path / "b_wide.jpg", quality=95)
    (tmp_path / "c_corrupt.png").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    (tmp_path / "d_empty.jpg").write_bytes(b"")
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    (tmp_path / "e_truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    rgba.paste(Image.new("RGBA", (16, 32), (0, 0, 255, 255)), (16, 0))
    rgba.save(tmp_path / "f_alpha.png")
    Image.new("L", (48, 48), 100).save(tmp_path / "g_gray.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    _halves(64, 32, RED, BLUE).save(tmp_path / "h_exif.jpg", exif=exif.tobytes(), quality=95)
    Image.new("RGB", (20, 20), (1, 2, 3)).save(tmp_path / "i_nocaption.png")
    (tmp_path / "notes.md").write_text("not an image")
    for stem in ["a_small", "b_wide", "c_corrupt", "d_empty", "e_truncated", "f_alpha", "g_gray", "h_exif"]:
        (tmp_path / f"{stem}.txt").write_text(f"  caption {stem}\n", encoding="utf-8")
    return tmp_path


def test_scan_skips_broken_files_with_reasons(messy_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="eridiffusion.data.folder"):
        scan = scan_folder(messy_folder)
    assert [p.name for p, _ in scan.items] == [
        "a_small.png",
        "b_wide.jpg",
        "f_alpha.png",
        "g_gray.jpg",
        "h_exif.jpg",
        "i_nocaption.png",
    ]
    assert scan.items[0][1] == "caption a_small"
    assert scan.items[-1][1] == ""
    assert [p.name for p in scan.missing_captions] == ["i_nocaption.png"]
    reasons = {p.name: r for p, r in scan.skipped}
    assert set(reasons) == {"c_corrupt.png", "d_empty.jpg", "e_truncated.png"}
    assert "0 bytes" in reasons["d_empty.jpg"]
    assert reasons["c_corrupt.png"].startswith("unreadable image")
    assert reasons["e_truncated.png"].startswith("unreadable image")
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("skipping ") for m in messages) == 3
    assert any("skipped 3 of 9 images" in m for m in messages)
    assert any("1 images" in m and "empty caption" in m for m in messages)


def test_dataset_tensors(messy_folder):
    dataset = ImageCaptionDataset(scan_folder(messy_folder), resolution=16)
    assert len(dataset) == 6
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["pixels"].shape == (3, 16, 16)
        assert item["pixels"].dtype == torch.float32
        assert item["pixels"].min() >= -1.0 and item["pixels"].max() <= 1.0
        assert item["index"] == i
    assert dataset[0]["caption"] == "caption a_small"
    wide = dataset[1]["pixels"]
    assert wide[0, :, 0].mean() > 0.9 and wide[2, :, -1].mean() > 0.9
    alpha = dataset[2]["pixels"]
    assert torch.allclose(alpha[:, :, :4], torch.ones(3, 16, 4))
    assert torch.allclose(alpha[:, :, -4:], torch.tensor([-1.0, -1.0, 1.0])[:, None, None].expand(3, 16, 4))
    gray = dataset[3]["pixels"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    lazy = ImageCaptionDataset(scan_folder(messy_folder), resolution=16, preload=False)
    assert all(torch.equal(lazy[i]["pixels"], dataset[i]["pixels"]) for i in range(len(dataset)))


def test_exif_orientation_applied(messy_folder):
    path = messy_folder / "h_exif.jpg"
    with Image.open(path) as raw:
        assert raw.size == (64, 32)
        expected = resize_and_crop(ImageOps.exif_transpose(raw).convert("RGB"), 32)
    assert load_rgb(path).size == (32, 64)
    pixels = ImageCaptionDataset([(path, "")], resolution=32)[0]["pixels"]
    assert torch.allclose(pixels, torch.from_numpy(np.array(expected)).permute(2, 0, 1) / 127.5 - 1.0)
    top, bottom = pixels[:, :12].mean(dim=(1, 2)), pixels[:, -12:].mean(dim=(1, 2))
    assert top[0] > 0.8 and top[2] < -0.8
    assert bottom[2] > 0.8 and bottom[0] < -0.8


def test_flip_is_deterministic_per_seed_epoch_index(tmp_path):
    items = []
    for i in range(12):
        path = tmp_path / f"{i:02d}.png"
        _halves(24, 24, RED, BLUE).save(path)
        items.append((path, f"image {i}"))
    plain = ImageCaptionDataset(items, resolution=24)
    a = ImageCaptionDataset(items, resolution=24, flip_x=True, seed=7)
    b = ImageCaptionDataset(items, resolution=24, flip_x=True, seed=7)

    def pattern(dataset, epoch):
        dataset.set_epoch(epoch)
        return [dataset.flips(i) for i in range(len(dataset))]

    patterns = [pattern(a, epoch) for epoch in range(3)]
    assert patterns == [pattern(b, epoch) for epoch in range(3)]
    assert patterns[0] != patterns[1] or patterns[1] != patterns[2]
    assert any(sum(p) for p in patterns) and not all(all(p) for p in patterns)
    other_seed = ImageCaptionDataset(items, resolution=24, flip_x=True, seed=8)
    assert [pattern(other_seed, epoch) for epoch in range(3)] != patterns
    a.set_epoch(2)
    for i, flipped in enumerate(patterns[2]):
        expected = plain[i]["pixels"].flip(-1) if flipped else plain[i]["pixels"]
        assert torch.equal(a[i]["pixels"], expected)
    assert not any(pattern(plain, 0))


def test_missing_folder_error_names_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="does not exist") as info:
        scan_folder(missing)
    assert str(missing) in str(info.value)


def test_empty_folder_error_names_path_and_extensions(tmp_path):
    (tmp_path / "only_caption.txt").write_text("a caption")
    with pytest.raises(DatasetError, match="contains no images") as info:
        scan_folder(tmp_path)
    assert str(tmp_path) in str(info.value) and ".png" in str(info.value)


def test_all_broken_images_is_an_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="none of the 1 images") as info:
        scan_folder(tmp_path)
    assert str(tmp_path) in str(info.value)
