"""Training data from the config's ``datasets`` list, served in a resumable deterministic order.

Batch *k* is a pure function of (seed, k): epoch = k // batches_per_epoch and the epoch's permutation comes
from its own seeded generator. Resuming at micro-batch *k* therefore needs no saved sampler state and yields
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from eridiffusion.config.schema import DatasetConfig
from eridiffusion.data.folder import DatasetError, ImageCaptionDataset, scan_folder
from eridiffusion.data.shapes import write_shapes_dataset

logger = logging.getLogger(__name__)


@dataclass
class Batch:
    pixels: torch.Tensor
    captions: list[str]
    dropout_rates: torch.Tensor
    epoch: int


class TrainingData:
    """All configured datasets concatenated, with repeats, per-dataset caption dropout and flips."""

    def __init__(self, configs: list[DatasetConfig], batch_size: int, seed: int) -> None:
        self.datasets: list[ImageCaptionDataset] = []
        self.index: list[tuple[int, int]] = []
        self.dropout: list[float] = []
        self.skipped = 0
        for i, cfg in enumerate(configs):
            folder = Path(cfg.folder_path)
            if cfg.synthetic is not None and not folder.exists():
                syn = cfg.synthetic
                logger.info("generating synthetic %s dataset in %s", syn.kind, folder)
                write_shapes_dataset(folder, n=syn.n, resolution=syn.resolution, seed=syn.seed)
            try:
                scan = scan_folder(folder, cfg.caption_ext)
            except DatasetError as exc:
                raise DatasetError(f"datasets[{i}].folder_path: {exc}") from None
            self.skipped += len(scan.skipped)
            if not scan.items:
                raise DatasetError(
                    f"datasets[{i}].folder_path: no readable images in '{folder}' "
                    f"({len(scan.skipped)} skipped as unreadable)"
                )
            ds = ImageCaptionDataset(scan, cfg.resolution, flip_x=cfg.flip_x, seed=seed + i)
            self.datasets.append(ds)
            for _ in range(cfg.num_repeats):
                self.index.extend((i, j) for j in range(len(ds)))
            self.dropout.extend([cfg.caption_dropout_rate] * (len(ds) * cfg.num_repeats))
        self.batch_size = batch_size
        self.seed = seed
        if len(self.index) < batch_size:
            raise DatasetError(
                f"train.batch_size={batch_size} is larger than the dataset ({len(self.index)} images with "
                "repeats); lower the batch size or raise datasets[].num_repeats"
            )
        self.batches_per_epoch = len(self.index) // batch_size

    def __len__(self) -> int:
        return len(self.index)

    def position(self, k: int) -> tuple[int, int]:
        """(epoch, batch within epoch) of micro-batch ``k``."""
        return divmod(k, self.batches_per_epoch)

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(
            len(self.index), generator=torch.Generator().manual_seed(self.seed * 9973 + epoch)
        )

    def batch(self, k: int) -> Batch:
        epoch, b = self.position(k)
        order = self._permutation(epoch)[b * self.batch_size : (b + 1) * self.batch_size].tolist()
        pixels, captions = [], []
        for flat in order:
            ds_i, item_i = self.index[flat]
            ds = self.datasets[ds_i]
            ds.set_epoch(epoch)
            item = ds[item_i]
            pixels.append(item["pixels"])
            captions.append(item["caption"])
        rates = torch.tensor([self.dropout[flat] for flat in order])
        return Batch(pixels=torch.stack(pixels), captions=captions, dropout_rates=rates, epoch=epoch)
