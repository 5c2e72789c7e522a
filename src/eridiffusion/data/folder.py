"""Image + caption folder datasets: the format users bring (cat.png beside cat.txt), also used by shapes data.

Captions come from same-stem text files or, when the folder has one, a Hugging Face style
``metadata.jsonl`` (``{"file_name": "cat.png", "text": "a cat"}`` per line). Every image is decoded once
while scanning, so a corrupt or truncated file is reported up front with its path instead of crashing a
training run hours in. Unreadable files are skipped with a warning rather than aborting: one bad download
should not block training on the other thousand images.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
UNSUPPORTED_IMAGE_EXTENSIONS = {".gif", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".psd", ".svg"}
"""Formats found in photo folders that we do not train on; reported so they are not lost silently."""
METADATA_FILE = "metadata.jsonl"
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
"""EXIF orientations that rotate by 90 degrees, i.e. swap width and height once applied."""


MASK_SUFFIXES = ("_mask", "-masklabel")
"""Stem endings that make an image file the loss mask of the image beside it: ``cat_mask.png`` for
``cat.png`` (and OneTrainer's ``cat-masklabel.png``)."""


class DatasetError(ValueError):
    """A dataset problem the user must fix; the message names the folder or file and what to do."""


@dataclass
class FolderScan:
    """Result of scanning one folder: usable (image, caption) pairs plus what was skipped and why."""

    folder: Path
    items: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    missing_captions: list[Path] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    """(width, height) of each item as displayed, i.e. after its EXIF rotation."""
    masks: dict[Path, Path] = field(default_factory=dict)
    """Loss mask files found beside the images (``cat_mask.png``), by image; never items themselves."""


def beside_masks(images: Iterable[Path]) -> dict[Path, Path]:
    """{image: its mask} for the files of ``images`` named like a mask of another of them.

    A file is a mask only when its image is there too, so a photo that happens to be called
    ``face_mask.png`` still trains when no ``face.png`` sits beside it.
    """
    files = sorted(images)
    by_stem: dict[Path, list[Path]] = {}
    for path in files:
        by_stem.setdefault(path.with_suffix(""), []).append(path)
    pairs: dict[Path, Path] = {}
    for path in files:
        for suffix in MASK_SUFFIXES:
            if path.stem.endswith(suffix) and len(path.stem) > len(suffix):
                for image in by_stem.get(path.with_name(path.stem[: -len(suffix)]), []):
                    pairs.setdefault(image, path)
    return {image: mask for image, mask in pairs.items() if image not in pairs.values()}


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) once the EXIF orientation is applied, read from the header without decoding."""
    width, height = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:
        orientation = 1
    return (height, width) if orientation in _TRANSPOSING_ORIENTATIONS else (width, height)


def _inspect_image(path: Path) -> tuple[str | None, tuple[int, int]]:
    """(why the image cannot be used or None, its upright size).

    verify() catches corrupt headers and checksums but not a file cut short, so the image is also loaded.
    Pillow's format plugins raise a zoo of exception types (OSError, SyntaxError, EOFError, struct.error,
    DecompressionBombError ...), hence the broad except: any failure here means "skip this file".
    """
    if path.stat().st_size == 0:
        return "empty file (0 bytes)", (0, 0)
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            size = upright_size(img)
            img.load()
    except Exception as exc:
        return f"unreadable image ({type(exc).__name__}: {exc})", (0, 0)
    return None, size


def read_metadata(folder: Path) -> dict[str, str] | None:
    """Captions by relative file name from ``metadata.jsonl`` (None when the folder has none).

    The caption is the ``text`` field (the Hugging Face imagefolder / diffusers convention) or ``caption``.
    A malformed line is an error rather than a skip: the user wrote this file and a silently dropped line
    would mean silently uncaptioned images.
    """
    path = folder / METADATA_FILE
    if not path.is_file():
        return None
    captions: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
            raise DatasetError(f'{path}:{lineno}: each line needs a "file_name" string, got {line.strip()!r}')
        text = record.get("text", record.get("caption", ""))
        if not isinstance(text, str):
            raise DatasetError(f'{path}:{lineno}: "text" must be a string, got {text!r}')
        captions[Path(record["file_name"]).as_posix()] = text.strip()
    return captions


def scan_folder(folder: Path, caption_ext: str = "txt") -> FolderScan:
    """Find the images inside folder (sorted by name) and pair each with its caption.

    Captions come from ``metadata.jsonl`` when the folder has one (its entries may name files in
    subfolders), otherwise from same-stem ``.caption_ext`` files. An image without a caption is kept with
    an empty caption, which trains it unconditionally (the usual convention in LoRA trainers), and listed
    in missing_captions so the caller can report it.
    """
    folder = Path(folder)
    if not folder.exists():
        raise DatasetError(
            f"dataset folder '{folder}' does not exist; "
            "set datasets[i].folder_path or run `eri data shapes <dir>`"
        )
    if not folder.is_dir():
        raise DatasetError(f"dataset path '{folder}' is a file, not a folder of images with captions")
    metadata = read_metadata(folder)
    files = [p for p in folder.iterdir() if p.is_file()]
    found = {p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS}
    unsupported = sorted(p.name for p in files if p.suffix.lower() in UNSUPPORTED_IMAGE_EXTENSIONS)
    if unsupported:
        shown = ", ".join(unsupported[:3]) + (" ..." if len(unsupported) > 3 else "")
        logger.warning(
            "ignoring %d file(s) in %s in unsupported formats (%s); convert them to %s",
            len(unsupported),
            folder,
            shown,
            "/".join(sorted(IMAGE_EXTENSIONS)),
        )
    listed_missing: list[Path] = []
    for name in metadata or {}:
        path = folder / name
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            found.add(path)
        else:
            listed_missing.append(path)
    masks = beside_masks(found)
    found -= set(masks.values())
    images = sorted(found, key=lambda p: p.relative_to(folder).as_posix())
    if not images:
        looked_for = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DatasetError(
            f"dataset folder '{folder}' contains no images (looked for {looked_for}); "
            f"add images with same-name .{caption_ext.lstrip('.')} caption files"
        )
    scan = FolderScan(folder, masks=masks)
    for path in listed_missing:
        problem = f"listed in {METADATA_FILE} but not an image file in the folder"
        logger.warning("skipping %s: %s", path, problem)
        scan.skipped.append((path, problem))
    for path in images:
        problem, size = _inspect_image(path)
        caption_path = path.with_suffix("." + caption_ext.lstrip("."))
        caption: str | None = None
        if metadata is not None:
            caption = metadata.get(path.relative_to(folder).as_posix())
        elif problem is None and caption_path.is_file():
            try:
                caption = caption_path.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                problem = f"caption file '{caption_path.name}' is not valid UTF-8"
        if problem is not None:
            logger.warning("skipping %s: %s", path, problem)
            scan.skipped.append((path, problem))
            continue
        if caption is None:
            scan.missing_captions.append(path)
        scan.items.append((path, caption or ""))
        scan.sizes.append(size)
    if scan.skipped:
        total = len(images) + len(listed_missing)
        logger.warning("skipped %d of %d images in %s", len(scan.skipped), total, folder)
    if not scan.items:
        first_path, first_problem = scan.skipped[0]
        raise DatasetError(
            f"none of the {len(images)} images in '{folder}' could be read "
            f"(first: {first_path.name}: {first_problem}); replace or remove the broken files"
        )
    if scan.missing_captions:
        logger.warning(
            "%d images in %s have no %s caption and will train with an empty caption",
            len(scan.missing_captions),
            folder,
            f"{METADATA_FILE}" if metadata is not None else "." + caption_ext.lstrip("."),
        )
    return scan


def has_alpha(img: Image.Image) -> bool:
    """Whether the image carries transparency (an alpha channel or a transparent palette entry)."""
    return img.mode in _ALPHA_MODES or "transparency" in img.info


def load_rgb(path: Path | IO[bytes]) -> Image.Image:
    """Decode an image as the viewer sees it: EXIF rotation applied, transparency composited over white.

    Compositing over white rather than dropping alpha keeps transparent regions from turning into
    whatever colour the encoder happened to store there (often black). Accepts a path or an open binary
    file (a tar member).
    """
    with Image.open(path) as raw:
        img = ImageOps.exif_transpose(raw)
    if has_alpha(img):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img.convert("RGB")


def cover_size(size: tuple[int, int], width: int, height: int) -> tuple[int, int]:
    """(width, height) that :func:`cover_resize` scales an image of ``size`` to; computed without decoding
    so crop offsets (SDXL's crop conditioning) can be known for images that are cached or not loaded."""
    scale = max(width / size[0], height / size[1])
    return max(width, round(size[0] * scale)), max(height, round(size[1] * scale))


def cover_resize(img: Image.Image, width: int, height: int) -> Image.Image:
    """Scale (LANCZOS, aspect kept) to the smallest size that covers width x height; crop it afterwards."""
    new_size = cover_size(img.size, width, height)
    return img.resize(new_size, Image.Resampling.LANCZOS) if new_size != img.size else img


def crop_offsets(
    size: tuple[int, int], width: int, height: int, position: tuple[float, float] | None = None
) -> tuple[int, int]:
    """(left, top) of a width x height crop of an image of ``size``: centred, or at ``position`` fractions
    in [0, 1) of the slack (random crops), so every offset from 0 to the slack is reachable."""
    slack_x, slack_y = size[0] - width, size[1] - height
    if position is None:
        return slack_x // 2, slack_y // 2
    return min(slack_x, int(position[0] * (slack_x + 1))), min(slack_y, int(position[1] * (slack_y + 1)))


def fit_and_crop(
    img: Image.Image, width: int, height: int, position: tuple[float, float] | None = None
) -> Image.Image:
    """Cover-resize to width x height, then crop (centred unless ``position`` is given)."""
    img = cover_resize(img, width, height)
    left, top = crop_offsets(img.size, width, height, position)
    return img.crop((left, top, left + width, top + height))


def resize_and_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Scale the shorter side to resolution (LANCZOS), then take the centre square."""
    return fit_and_crop(img, resolution, resolution)


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8: a quarter of float32's memory, so preloaded datasets stay small."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def file_digest(path: Path, memo: dict[str, str] | None = None) -> str:
    """Content hash of a file (BLAKE2b), memoised by (path, size, mtime) so re-runs skip re-reading photos."""
    stat = path.stat()
    memo_key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    if memo is not None and memo_key in memo:
        return memo[memo_key]
    digest = hashlib.blake2b(digest_size=20)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    if memo is not None:
        memo[memo_key] = value
    return value


class FolderSource:
    """A scanned folder as the training data sees it: captions, upright sizes, decoding and content hashes."""

    streamed = False

    def __init__(self, scan: FolderScan) -> None:
        self.root = scan.folder
        self.paths = [Path(p) for p, _ in scan.items]
        self.captions = [c for _, c in scan.items]
        self.sizes = list(scan.sizes) or [_upright_size_of(p) for p in self.paths]
        self.skipped = len(scan.skipped)
        self.masks: list[Path | None] = [scan.masks.get(p) for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def label(self, index: int) -> str:
        return str(self.paths[index])

    def open(self, index: int) -> Image.Image:
        return load_rgb(self.paths[index])

    def digest(self, index: int, memo: dict[str, str] | None = None) -> str:
        return file_digest(self.paths[index], memo)

    def default_cache_dir(self) -> Path:
        return self.root / ".eri_cache"


def _upright_size_of(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return upright_size(img)


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Square training crops with captions, pixels in [-1, 1] as the VAEs and pixel-space models expect.

    A plain map-style torch Dataset at one resolution, for notebooks and other tools; the trainer's
    bucketed, cached, multi-dataset pipeline is :class:`eridiffusion.data.loader.TrainingData`.
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
        return to_uint8_tensor(resize_and_crop(img, self.resolution))

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
