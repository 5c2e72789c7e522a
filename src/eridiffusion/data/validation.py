"""Which images are held out for validation, and the validation set's datasets.

Two ways to hold images out, as kohya and OneTrainer do: ``datasets[i].validation_split`` takes a fraction of
a folder's images, and a dataset with ``is_val: true`` is validation only. The split is a pure function of
the run seed and the file names relative to the folder (files sorted by a hash of both, the first
``round(n x fraction)`` held out), so it is the same on every machine, across resumes and in every pipeline
step that reads the folder, and adding an image moves no other image across the line. Held-out files are
never trained on: the training data is built from what is left.

A validation set is read without augmentation: no flips, centre crops, no caption dropout or tag
shuffling, each image once, and never from the latent or text cache (the cache describes training views).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from eridiffusion.config.schema import DatasetConfig
from eridiffusion.data.folder import DatasetError, FolderScan, FolderSource
from eridiffusion.data.loader import ImageSource

PLAIN = {
    "flip_x": False,
    "crop": "center",
    "caption_dropout_rate": 0.0,
    "shuffle_tokens": False,
    "num_repeats": 1,
    "weight": 1.0,
    "is_reg": False,
    "is_val": False,
    "validation_split": 0.0,
    "cache_latents_to_disk": False,
    "cache_text_embeddings": False,
}
"""What a dataset entry becomes when it is read as validation images."""


def held_out_count(n: int, fraction: float) -> int:
    """Images a split of ``fraction`` holds out of ``n`` (0 when there is no split)."""
    return round(n * fraction) if fraction else 0


def split_problem(n: int, fraction: float, where: str) -> str | None:
    """Why ``fraction`` of ``n`` images cannot be split (none held out, or none left), or None."""
    if not fraction:
        return None
    held = held_out_count(n, fraction)
    if held < 1:
        need = 1 / (2 * n) if n else 1
        return (
            f"{where}.validation_split: {fraction:g} of {n} image(s) holds out none; raise it above "
            f"{need:.3g} or add images (or use a separate dataset with is_val: true)"
        )
    if held >= n:
        return (
            f"{where}.validation_split: {fraction:g} of {n} image(s) holds out all {held}, leaving none to "
            "train; lower it or add images"
        )
    return None


def _rank(seed: int, name: str) -> str:
    return hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=16).hexdigest()


def held_out_items(names: Sequence[str], fraction: float, seed: int) -> set[int]:
    """Indices of the held-out names: the ``round(n x fraction)`` whose hash with ``seed`` sorts first."""
    order = sorted(range(len(names)), key=lambda i: (_rank(seed, names[i]), names[i]))
    return set(order[: held_out_count(len(names), fraction)])


def _relative_names(source: FolderSource) -> list[str]:
    """File names relative to the folder, so the split does not depend on where the folder lies."""
    names = []
    for p in source.paths:
        try:
            names.append(p.relative_to(source.root).as_posix())
        except ValueError:
            names.append(p.name)
    return names


def _subset(source: FolderSource, keep: list[int]) -> FolderSource:
    """A folder source of only these items (captions, sizes and cache location as the whole folder's)."""
    items = [(source.paths[i], source.captions[i]) for i in keep]
    sub = FolderSource(FolderScan(source.root, items, sizes=[source.sizes[i] for i in keep]))
    sub.skipped = source.skipped
    return sub


@dataclass
class Split:
    """The datasets as training and validation see them (each list with its sources, in order)."""

    train: list[DatasetConfig] = field(default_factory=list)
    train_sources: list[ImageSource] = field(default_factory=list)
    val: list[DatasetConfig] = field(default_factory=list)
    val_sources: list[ImageSource] = field(default_factory=list)
    val_names: list[str] = field(default_factory=list)
    """What each validation entry is, for the report: ``datasets[0] held out (3 of 30)``."""


def split_datasets(
    configs: Sequence[DatasetConfig], sources: Sequence[ImageSource], seed: int, where: str = "datasets"
) -> Split:
    """Training and validation datasets: ``is_val`` sets go to validation whole, a ``validation_split``
    folder gives its held-out images to validation and the rest to training, other sets train whole."""
    out = Split()
    for i, (cfg, src) in enumerate(zip(configs, sources, strict=True)):
        plain = cfg.model_copy(update=PLAIN)
        if cfg.is_val:
            out.val.append(plain)
            out.val_sources.append(src)
            out.val_names.append(f"{where}[{i}] (is_val, {len(src)} images)")
            continue
        if not cfg.validation_split:
            out.train.append(cfg)
            out.train_sources.append(src)
            continue
        if not isinstance(src, FolderSource):  # the schema refuses shards with a split; callers may not
            raise DatasetError(f"{where}[{i}].validation_split: only folder datasets can be split")
        problem = split_problem(len(src), cfg.validation_split, f"{where}[{i}]")
        if problem:
            raise DatasetError(problem)
        held = held_out_items(_relative_names(src), cfg.validation_split, seed)
        out.train.append(cfg)
        out.train_sources.append(_subset(src, [j for j in range(len(src)) if j not in held]))
        out.val.append(plain)
        out.val_sources.append(_subset(src, sorted(held)))
        out.val_names.append(f"{where}[{i}] held out ({len(held)} of {len(src)} images)")
    return out
