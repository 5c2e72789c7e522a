"""Small generated image sets for the data-pipeline tests: mixed sizes plus the files real folders contain
(a corrupt file, a zero-byte file, a PNG with alpha, a grayscale JPEG, an EXIF-rotated JPEG, an image
without a caption)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

# (width, height) of the ordinary images: landscape, portrait and square, all at least 16 px a side
SIZES = [(32, 16), (16, 32), (24, 24), (40, 20), (20, 20), (30, 20), (16, 24), (48, 16), (28, 28), (36, 24)]
TAGS = ["red", "blue", "green", "round", "square", "small", "large", "left", "right"]


def _noise(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (height, width, channels) if channels else (height, width)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def caption_for(i: int) -> str:
    """Comma-separated tags, so shuffle_tokens has something to shuffle."""
    return ", ".join([f"img{i}", *(TAGS[(i + j) % len(TAGS)] for j in range(3))])


def write_mixed_folder(folder: Path, n: int = len(SIZES), with_problems: bool = True) -> list[str]:
    """Write n ordinary captioned images (cycling through SIZES) and, with_problems, the awkward files.

    Returns the names of the usable images.
    """
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        width, height = SIZES[i % len(SIZES)]
        name = f"img{i:02d}.{'jpg' if i % 3 == 0 else 'png'}"
        _noise(width, height, i).save(folder / name, quality=95)
        (folder / name).with_suffix(".txt").write_text(caption_for(i) + "\n", encoding="utf-8")
        names.append(name)
    if with_problems:
        (folder / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
        (folder / "zz_corrupt.txt").write_text("never used")
        (folder / "zz_zero.jpg").write_bytes(b"")
        _noise(24, 16, 100, "RGBA").save(folder / "zz_alpha.png")
        (folder / "zz_alpha.txt").write_text("alpha, png")
        Image.fromarray(np.full((20, 28), 90, dtype=np.uint8), mode="L").save(folder / "zz_gray.jpg")
        (folder / "zz_gray.txt").write_text("gray, jpeg")
        exif = Image.Exif()
        exif[0x0112] = 6  # stored 32x16, displayed rotated 90 degrees: 16 wide, 32 tall
        _noise(32, 16, 101).save(folder / "zz_exif.jpg", exif=exif.tobytes(), quality=95)
        (folder / "zz_exif.txt").write_text("exif, rotated")
        _noise(20, 20, 102).save(folder / "zz_nocaption.png")
        names += ["zz_alpha.png", "zz_exif.jpg", "zz_gray.jpg", "zz_nocaption.png"]
    return sorted(names)


def write_shards(folder: Path, n_shards: int, per_shard: int, corrupt_member: bool = False) -> list[Path]:
    """webdataset-style shards 'shard-000.tar' ...: sample key 'k{shard}{i}' as image .png + caption .txt."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        path = folder / f"shard-{s:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"s{s}/k{s:02d}{i:02d}"
                width, height = SIZES[(s * per_shard + i) % len(SIZES)]
                buffer = io.BytesIO()
                _noise(width, height, 1000 * s + i).save(buffer, format="PNG")
                data = buffer.getvalue()
                if corrupt_member and s == 0 and i == 0:
                    data = data[: len(data) // 2]  # header intact, pixels cut short
                _add(tar, f"{key}.png", data)
                _add(tar, f"{key}.txt", caption_for(s * per_shard + i).encode())
        paths.append(path)
    return paths


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
