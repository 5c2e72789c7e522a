"""The class folder of DreamBooth prior preservation: how many images it still needs and where new ones go.

A regularisation dataset with ``class_prompt`` is filled up to ``num_class_images`` images by the training
step (:mod:`eridiffusion.training.class_images`); this module is the part that needs no model. Images the
user put in the folder count towards the total and are never touched: generated files take free names
``class_NNNNN`` (an index whose image *or* caption already exists is skipped), and each file is written
under a temporary name and renamed into place, so an interrupted run leaves no half-written image that a
later run would count as done.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

from PIL import Image, PngImagePlugin

from eridiffusion.config.schema import DatasetConfig
from eridiffusion.data.folder import IMAGE_EXTENSIONS

CLASS_STEM = "class_"
"""Stem prefix of generated class images; the number after it is also the image's seed offset."""


def count_images(folder: Path) -> int:
    """Images directly inside ``folder`` (0 when it does not exist), as the folder scan would find them."""
    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def missing_class_images(d: DatasetConfig) -> int:
    """Class images still to generate for dataset ``d`` (0 when it has no ``class_prompt``)."""
    if d.class_prompt is None or d.folder_path is None:
        return 0
    return max(0, d.num_class_images - count_images(Path(d.folder_path)))


def free_indices(folder: Path, count: int, caption_ext: str) -> list[int]:
    """The first ``count`` indices ``k`` whose ``class_k`` image (any extension) and caption are both
    unused: a user's file of that name is never overwritten."""
    taken = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    stems = {Path(name).stem for name in taken}
    out: list[int] = []
    k = 0
    while len(out) < count:
        stem = f"{CLASS_STEM}{k:05d}"
        if stem not in stems and f"{stem}.{caption_ext}" not in taken:
            out.append(k)
        k += 1
    return out


def _write_new(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename to ``path``; refuses (FileExistsError) rather than replace a file that
    appeared meanwhile."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        _link_new(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _link_new(tmp: Path, path: Path) -> None:
    """``path`` becomes ``tmp``'s content unless it exists (then FileExistsError)."""
    try:
        os.link(tmp, path)  # fails if path exists: nothing of the user's is ever replaced
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links: check, then rename
        if path.exists():
            raise FileExistsError(f"{path} exists; it is left as it is") from None
        os.replace(tmp, path)


def write_class_example(
    folder: Path,
    index: int,
    image: Image.Image,
    caption: str,
    caption_ext: str,
    pnginfo: PngImagePlugin.PngInfo | None = None,
) -> Path:
    """Write one generated image as ``class_NNNNN.png`` (with ``pnginfo``: how it was drawn) and its
    caption beside it; the caption goes first, so a half-finished pair is an orphan caption, never an
    uncaptioned image."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{CLASS_STEM}{index:05d}"
    _write_new(folder / f"{stem}.{caption_ext}", lambda p: p.write_text(caption + "\n", encoding="utf-8"))
    image_path = folder / f"{stem}.png"
    _write_new(image_path, lambda p: image.save(p, format="PNG", pnginfo=pnginfo))
    return image_path


def class_datasets(datasets: list[DatasetConfig]) -> Iterator[tuple[int, DatasetConfig]]:
    """(index, dataset) of the entries that generate class images."""
    return ((i, d) for i, d in enumerate(datasets) if d.class_prompt is not None)
