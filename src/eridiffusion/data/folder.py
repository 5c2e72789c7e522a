"""Image + caption folder datasets: the format users bring (cat.png beside cat.txt), also used by shapes data.

Every image is decoded once while scanning, so a corrupt or truncated file is reported up front with its
path instead of crashing a training run hours in. Unreadable files are skipped with a warning rather than
aborting: one bad download should not block training on the other thousand images.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


class DatasetError(ValueError):
    """A dataset problem the user must fix; the message names the folder or file and what to do."""


@dataclass
class FolderScan:
    """Result of scanning one folder: usable (image, caption) pairs plus what was skipped and why."""

    folder: Path
    items: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    missing_captions: list[Path] = field(default_factory=list)


def _image_problem(path: Path) -> str | None:
    """Why an image cannot be used, or None when it decodes fully.

    verify() catches corrupt headers and checksums but not a file cut short, so the image is also loaded.
    Pillow's format plugins raise a zoo of exception types (OSError, SyntaxError, EOFError, struct.error,
    DecompressionBombError ...), hence the broad except: any failure here means "skip this file".
    """
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            img.load()
    except Exception as exc:
        return f"unreadable image ({type(exc).__name__}: {exc})"
    return None


def scan_folder(folder: Path, caption_ext: str = "txt") -> FolderScan:
    """Find the images directly inside folder (sorted by name) and pair each with its same-stem caption.

    An image without a caption file is kept with an empty caption, which trains it unconditionally (the
    usual convention in LoRA trainers), and listed in missing_captions so the caller can report it.
    """
    folder = Path(folder)
    if not folder.exists():
        raise DatasetError(
            f"dataset folder '{folder}' does not exist; "
            "set datasets[i].folder_path or run `eri data shapes <dir>`"
        )
    if not folder.is_dir():
        raise DatasetError(f"dataset path '{folder}' is a file, not a folder of images with captions")
    images = sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda p: p.name,
    )
    if not images:
        looked_for = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DatasetError(
            f"dataset folder '{folder}' contains no images (looked for {looked_for}); "
            f"add images with same-name .{caption_ext.lstrip('.')} caption files"
        )
    scan = FolderScan(folder)
    for path in images:
        problem = _image_problem(path)
        caption_path = path.with_suffix("." + caption_ext.lstrip("."))
        caption = ""
        if problem is None and caption_path.is_file():
            try:
                caption = caption_path.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                problem = f"caption file '{caption_path.name}' is not valid UTF-8"
        if problem is not None:
            logger.warning("skipping %s: %s", path, problem)
            scan.skipped.append((path, problem))
            continue
        if not caption_path.is_file():
            scan.missing_captions.append(path)
        scan.items.append((path, caption))
    if scan.skipped:
        logger.warning("skipped %d of %d images in %s", len(scan.skipped), len(images), folder)
    if not scan.items:
        first_path, first_problem = scan.skipped[0]
        raise DatasetError(
            f"none of the {len(images)} images in '{folder}' could be read "
            f"(first: {first_path.name}: {first_problem}); replace or remove the broken files"
        )
    if scan.missing_captions:
        logger.warning(
            "%d images in %s have no .%s caption and will train with an empty caption",
            len(scan.missing_captions),
            folder,
            caption_ext.lstrip("."),
        )
    return scan


def load_rgb(path: Path) -> Image.Image:
    """Decode an image as the viewer sees it: EXIF rotation applied, transparency composited over white.

    Compositing over white rather than dropping alpha keeps transparent regions from turning into
    whatever colour the encoder happened to store there (often black).
    """
    with Image.open(path) as raw:
        img = ImageOps.exif_transpose(raw)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img.convert("RGB")


def resize_and_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Scale the shorter side to resolution (LANCZOS), then take the centre square."""
    width, height = img.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if new_size != img.size:
        img = img.resize(new_size, Image.Resampling.LANCZOS)
    left, top = (new_size[0] - resolution) // 2, (new_size[1] - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def _to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Square training crops with captions, pixels in [-1, 1] as the VAEs and pixel-space models expect.

    With preload (the default) every image is decoded once into one uint8 tensor: small datasets then cost
    no decoding per step, which matters on CPU. The random horizontal flip is a pure function of
    (seed, epoch, index), so a resumed run sees exactly the flips an uninterrupted one would; call
    set_epoch() at the start of each epoch (before creating DataLoader iterators, so workers get it).
    """

    def __init__(
        self,
        items: FolderScan | Sequence[tuple[Path, str]],
        resolution: int,
        flip_x: bool = False,
        seed: int = 0,
        preload: bool = True,
    ) -> None:
        pairs = items.items if isinstance(items, FolderScan) else list(items)
        if not pairs:
            raise DatasetError("dataset has no images to train on")
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.paths = [Path(p) for p, _ in pairs]
        self.captions = [c for _, c in pairs]
        self.resolution = resolution
        self.flip_x = flip_x
        self.seed = seed
        self.epoch = 0
        self._cache = torch.stack([self._decode(i) for i in range(len(pairs))]) if preload else None

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        """Select the flip pattern for this epoch (same idea as DistributedSampler.set_epoch)."""
        self.epoch = epoch

    def _decode(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            img = load_rgb(path)
        except Exception as exc:
            raise DatasetError(f"cannot read image '{path}' ({type(exc).__name__}: {exc})") from exc
        return _to_uint8_tensor(resize_and_crop(img, self.resolution))

    def flips(self, index: int) -> bool:
        """Whether item index is mirrored this epoch; independent of worker count and access order."""
        if not self.flip_x:
            return False
        state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(state))
        return bool(torch.rand((), generator=generator) < 0.5)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pixels = self._cache[index] if self._cache is not None else self._decode(index)
        if self.flips(index):
            pixels = pixels.flip(-1)
        return {"pixels": pixels.float() / 127.5 - 1.0, "caption": self.captions[index], "index": index}
