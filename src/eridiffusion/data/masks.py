"""Loss masks: a greyscale image per training image that weights its loss pixel by pixel.

A mask sits beside its image (``cat_mask.png`` for ``cat.png``, see :data:`~.folder.MASK_SUFFIXES`), in
``datasets[i].mask_path`` under the image's name (``mask_path/cat.png``, as kohya's
``conditioning_data_dir`` and ai-toolkit's ``mask_path`` read it), or is the image's own alpha channel
(``alpha_mask``, kohya's and ai-toolkit's key; an image without transparency then has no mask). White
(opaque) is full weight, black (transparent) is ``unmasked_weight`` and grey lies linearly in between
(ai-toolkit's mapping of ``mask_min_value``); the luminance is read, so a colour mask works as its grey
version. An image without a mask has weight 1 everywhere.

A mask goes through the same geometry as its image (the bucket's cover resize, the crop, the flip), so
:class:`MaskSet` only decodes and resizes; the training data crops masks with the image's own crop offsets.
The training step weights each element of the loss by the mask averaged down to the latent's size
(:func:`resize_loss_mask`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors.torch import load_file

from eridiffusion.config.schema import DatasetConfig
from eridiffusion.data.folder import (
    IMAGE_EXTENSIONS,
    DatasetError,
    FolderSource,
    beside_masks,
    cover_size,
    has_alpha,
    upright_size,
)

if TYPE_CHECKING:
    from eridiffusion.data.loader import ImageSource, TrainingData

ASPECT_TOLERANCE = 0.02
"""How far a mask's aspect ratio may differ from its image's (rounding in an export) before it is refused."""


def _mask_folder_files(folder: Path) -> dict[str, Path]:
    """Images under ``folder`` by their relative path without suffix (``sub/cat`` for ``sub/cat.png``)."""
    files: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            files.setdefault(path.relative_to(folder).with_suffix("").as_posix(), path)
    return files


def find_masks(cfg: DatasetConfig, source: ImageSource, where: str) -> list[Path | None]:
    """Per item of ``source``, its mask file or None; ``where`` (``datasets[i]``) prefixes every error.

    With ``mask_path`` the masks come from that folder only (a mask beside an image is then not read);
    a folder in which no file is named like any image is an error, as it is almost always the wrong folder.
    File names and headers only: :func:`check_masks` decodes them.
    """
    if not isinstance(source, FolderSource):
        return [None] * len(source)
    if cfg.alpha_mask:
        return [p if _transparent(p) else None for p in source.paths]
    if cfg.mask_path is None:
        masks = list(source.masks)
    else:
        folder = Path(cfg.mask_path)
        if not folder.is_dir():
            raise DatasetError(
                f"{where}.mask_path: '{folder}' is not a folder; point it at the folder of mask images "
                "named like the training images (cat.png -> mask_path/cat.png)"
            )
        files = _mask_folder_files(folder)
        masks = [files.get(p.relative_to(source.root).with_suffix("").as_posix()) for p in source.paths]
        if not any(masks):
            raise DatasetError(
                f"{where}.mask_path: no file in '{folder}' is named like an image of "
                f"'{source.root}'; a mask has its image's name (cat.png -> {folder / 'cat.png'})"
            )
    return masks


def check_masks(cfg: DatasetConfig, source: ImageSource, where: str) -> None:
    """Decode every mask of a dataset once, so a broken one stops the run while the data is scanned, before
    any model loads (alpha masks are the images themselves, which the scan already read)."""
    if cfg.alpha_mask:
        return
    for mask, size in zip(find_masks(cfg, source, where), source.sizes, strict=True):
        if mask is not None:
            check_mask(mask, size, where)


def _transparent(path: Path) -> bool:
    with Image.open(path) as img:  # the header only; the scan already decoded the image once
        return has_alpha(img)


def check_mask(path: Path, image_size: tuple[int, int], where: str) -> None:
    """Refuse a mask that cannot be read or whose shape does not match its image's (it would misalign)."""
    try:
        with Image.open(path) as img:
            size = upright_size(img)
            img.load()
    except Exception as exc:
        raise DatasetError(
            f"{where}: cannot read loss mask '{path}' ({type(exc).__name__}: {exc}); replace it with a "
            "greyscale PNG, or delete it to train that image unmasked"
        ) from None
    mask_aspect, image_aspect = size[0] / size[1], image_size[0] / image_size[1]
    if abs(mask_aspect / image_aspect - 1) > ASPECT_TOLERANCE:
        raise DatasetError(
            f"{where}: loss mask '{path}' is {size[0]}x{size[1]} px but its image is "
            f"{image_size[0]}x{image_size[1]}; a mask must have its image's shape (export it at that size)"
        )


def load_mask(path: Path, image_size: tuple[int, int], alpha: bool = False) -> Image.Image:
    """The mask as 8-bit luminance (or the file's alpha channel) at its image's upright size, EXIF rotation
    applied as for images."""
    try:
        with Image.open(path) as raw:
            upright = ImageOps.exif_transpose(raw)
            img = upright.convert("RGBA").getchannel("A") if alpha else upright.convert("L")
    except Exception as exc:
        raise DatasetError(f"cannot read loss mask '{path}' ({type(exc).__name__}: {exc})") from None
    return img.resize(image_size, Image.Resampling.BILINEAR) if img.size != image_size else img


class MaskSet:
    """The mask file of every item of every dataset, and their decoding at a view's resize."""

    def __init__(self, configs: Sequence[DatasetConfig], sources: Sequence[ImageSource]) -> None:
        self.configs = list(configs)
        self.sources = list(sources)
        pairs = zip(self.configs, self.sources, strict=True)
        self.files = [find_masks(cfg, src, f"datasets[{i}]") for i, (cfg, src) in enumerate(pairs)]

    def file(self, dataset: int, item: int) -> Path | None:
        return self.files[dataset][item]

    def count(self, dataset: int) -> int:
        return sum(1 for f in self.files[dataset] if f is not None)

    def decode(self, dataset: int, item: int, width: int, height: int) -> torch.Tensor | None:
        """uint8 (1, H, W) mask cover-resized for a width x height view as its image is, or None.

        BILINEAR, not the images' LANCZOS: a weight map must not ring past black and white at edges.
        """
        path = self.files[dataset][item]
        if path is None:
            return None
        size = self.sources[dataset].sizes[item]
        img = load_mask(path, size, alpha=self.configs[dataset].alpha_mask)
        new_size = cover_size(size, width, height)
        if new_size != img.size:
            img = img.resize(new_size, Image.Resampling.BILINEAR)
        return torch.from_numpy(np.array(img, dtype=np.uint8)).unsqueeze(0)


def mask_weights(coverage: torch.Tensor, unmasked_weight: float, normalize: bool) -> torch.Tensor:
    """Loss weights from a mask's coverage in [0, 1]: black -> ``unmasked_weight``, white -> exactly 1.

    With ``normalize`` the weights are divided by their mean (OneTrainer's ``normalize_masked_area_loss``),
    so a small masked region trains as strongly per image as a whole picture does; an all-zero mask stays 0.
    """
    weights = torch.lerp(torch.full_like(coverage, unmasked_weight), torch.ones_like(coverage), coverage)
    if normalize:
        mean = weights.mean()
        if float(mean) > 0:
            weights = weights / mean
    return weights


def resize_loss_mask(weights: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Loss weights (..., H, W) averaged over areas down to ``size`` (kohya's ``mode="area"``): each latent
    element gets the mean weight of the pixels it encodes. A map already of that size is returned as is."""
    if tuple(weights.shape[-2:]) == tuple(size):
        return weights
    lead = weights.shape[:-2]
    flat = weights.reshape(-1, 1, *weights.shape[-2:])
    return F.interpolate(flat, size=size, mode="area").reshape(*lead, *size)


def view_weights(data: TrainingData, v: int, epoch: int | None, flip: bool) -> torch.Tensor:
    """Float (1, H, W) loss weights of view v at pixel size (it must have a mask)."""
    cfg = data.configs[data.views[v].dataset]
    coverage = data.view_mask(v, epoch, flip).float() / 255.0
    return mask_weights(coverage, cfg.unmasked_weight, cfg.normalize_masked_area_loss)


def _cached_weights(data: TrainingData, v: int, flip: bool) -> torch.Tensor:
    """Float (1, h, w) loss weights of view v at latent size, from the latent cache (data/cache.py)."""
    entry = data.mask_lookup.get((v, flip))
    if entry is None:
        raise DatasetError(f"no cached loss mask for {data.label(v)}; the cache was not prepared")
    return load_file(entry)["mask"] if isinstance(entry, Path) else entry


def batch_loss_mask(
    data: TrainingData, ids: Sequence[int], flips: Sequence[bool], epoch: int, cached: bool
) -> torch.Tensor | None:
    """(B, 1, H, W) float loss weights of a micro-batch's views, or None when none of them has a mask.

    Uncached views give their weights at pixel size; cached ones the same weights already averaged down to
    latent size by the same :func:`resize_loss_mask` the step applies to the former, so both give the step
    identical values. Rows without a mask get ones.
    """
    rows: list[torch.Tensor | None] = []
    for v, flip in zip(ids, flips, strict=True):
        view = data.views[v]
        if data.masks.file(view.dataset, view.item) is None:
            rows.append(None)
        else:
            rows.append(_cached_weights(data, v, flip) if cached else view_weights(data, v, epoch, flip))
    present = [r for r in rows if r is not None]
    if not present:
        return None
    ones = torch.ones_like(present[0])
    return torch.stack([ones if r is None else r for r in rows])


def mask_notes(configs: Sequence[DatasetConfig]) -> list[str]:
    """``eri validate``'s plan lines: how many images of each folder dataset have a loss mask, counted from
    file names alone (top-level images; the training scan also reads the masks and checks their shapes)."""
    lines = []
    for i, cfg in enumerate(configs):
        if cfg.folder_path is None or not Path(cfg.folder_path).is_dir():
            continue
        folder = Path(cfg.folder_path)
        files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        beside = beside_masks(files)
        images = [p for p in files if p not in set(beside.values())]
        if cfg.alpha_mask:
            masked = sum(1 for p in images if _transparent(p))
        elif cfg.mask_path is None:
            masked = len(beside)
        elif Path(cfg.mask_path).is_dir():
            names = _mask_folder_files(Path(cfg.mask_path))
            masked = sum(1 for p in images if p.stem in names)
        else:
            continue
        if masked:
            lines.append(f"  datasets[{i}]: loss masks on {masked} of {len(images)} images")
    return lines
