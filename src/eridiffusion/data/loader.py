"""Training data from the config's ``datasets`` list, served in a resumable deterministic order.

Every image becomes one *view* per training size it is used at (its aspect-ratio bucket at each listed
resolution, or the square crop when buckets are off). Each epoch gets a plan, a pure function of
(seed, epoch): every dataset contributes ``num_repeats x weight`` copies of its views (a fractional part
is a fresh random subset each epoch; regularisation sets are scaled to match the training sets), views are
grouped by bucket, shuffled and cut into batches of one size (a bucket's last batch may be smaller), and
the batches are shuffled. Micro-batch *k* is found by counting batches per epoch (a constant unless a
fractional weight changes the bucket counts), so resuming at *k* needs no saved sampler state, and
DataLoader workers, which each build batch *k* on their own, cannot change the order. Flips, random crops
and tag shuffles are drawn per (seed, epoch, view) for the same reason.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from eridiffusion.config.schema import DatasetConfig
from eridiffusion.data.batch import Batch
from eridiffusion.data.buckets import assign_bucket, format_bucket_counts
from eridiffusion.data.captions import PLACEHOLDERS, apply_trigger, shuffle_tags
from eridiffusion.data.folder import (
    DatasetError,
    FolderSource,
    cover_resize,
    cover_size,
    crop_offsets,
    scan_folder,
    to_uint8_tensor,
)
from eridiffusion.data.masks import MaskSet, batch_loss_mask, check_masks
from eridiffusion.data.shapes import write_shapes_dataset
from eridiffusion.data.shards import ShardSource, resolve_shards
from eridiffusion.models.protocol import Conditioning

logger = logging.getLogger(__name__)

PRELOAD_BYTES = 512 * 2**20
"""Decoded images (uint8) and cached tensors are held in memory when they fit in this; larger datasets are
read per batch, which is what DataLoader workers (``train.num_workers``) are for."""

_FLIP, _CROP, _TAGS, _SELECT, _ORDER = 1, 2, 3, 4, 5
"""Salts that keep the random streams of one (seed, epoch, view) independent of each other."""


class ImageSource(Protocol):
    """What the training data needs from a folder or a set of shards."""

    streamed: bool
    sizes: list[tuple[int, int]]
    captions: list[str]
    skipped: int

    def __len__(self) -> int: ...

    def label(self, index: int) -> str: ...

    def open(self, index: int) -> Image.Image: ...

    def default_cache_dir(self) -> Path: ...


@dataclass(frozen=True)
class View:
    """One image at one training size."""

    dataset: int
    item: int
    width: int
    height: int
    resolution: int


def _rng(seed: int, epoch: int, view: int, salt: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed % 2**63, epoch, view, salt]))


def _generator(seed: int, epoch: int, salt: int) -> torch.Generator:
    state = np.random.SeedSequence([seed % 2**63, epoch, salt]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))


def open_sources(configs: Sequence[DatasetConfig]) -> list[ImageSource]:
    """Scan every dataset (generating synthetic ones first); errors name ``datasets[i]``.

    Runs before the model is loaded, so a typo in a path fails in a second rather than after minutes of
    loading weights.
    """
    sources: list[ImageSource] = []
    for i, cfg in enumerate(configs):
        if cfg.shards is not None:
            try:
                paths = resolve_shards(cfg.shards)
                cache = Path(cfg.cache_dir) if cfg.cache_dir else paths[0].parent / ".eri_cache"
                sources.append(ShardSource(paths, cfg.caption_ext, cache / "shards"))
            except DatasetError as exc:
                raise DatasetError(f"datasets[{i}].shards: {exc}") from None
            continue
        folder = Path(str(cfg.folder_path))
        if cfg.synthetic is not None and not folder.exists():
            syn = cfg.synthetic
            logger.info("generating synthetic %s dataset in %s", syn.kind, folder)
            try:
                write_shapes_dataset(
                    folder,
                    syn.n,
                    syn.resolution,
                    syn.seed,
                    colours=syn.colours,
                    held_out=syn.held_out,
                    captions=syn.captions,
                )
            except ValueError as exc:
                raise DatasetError(f"datasets[{i}].synthetic.{exc}") from None
        try:
            sources.append(FolderSource(scan_folder(folder, cfg.caption_ext)))
        except DatasetError as exc:
            raise DatasetError(f"datasets[{i}].folder_path: {exc}") from None
        check_masks(cfg, sources[-1], f"datasets[{i}]")
    return sources


def _dataset_name(cfg: DatasetConfig) -> str:
    return str(cfg.folder_path) if cfg.folder_path is not None else str(cfg.shards)


class TrainingData:
    """All configured datasets as bucketed, weighted, deterministic micro-batches."""

    def __init__(
        self,
        configs: Sequence[DatasetConfig],
        batch_size: int,
        seed: int,
        size_multiple: int,
        sources: Sequence[ImageSource] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.configs = list(configs)
        self.sources = list(sources) if sources is not None else open_sources(self.configs)
        self.batch_size = batch_size
        self.seed = seed
        self.size_multiple = size_multiple
        self.skipped = sum(src.skipped for src in self.sources)
        self.masks = MaskSet(self.configs, self.sources)
        self.unusable = 0
        self.captions = [self._prepare_captions(i) for i in range(len(self.configs))]
        self.views: list[View] = []
        self.view_ids: list[list[int]] = []
        for i in range(len(self.configs)):
            self.view_ids.append(self._make_views(i))
        self.group_of = [self._group(v) for v in self.views]
        self.repeats = self._repeats()
        self.latent_lookup: dict[tuple[int, bool], Path | torch.Tensor] = {}
        self.mask_lookup: dict[tuple[int, bool], Path | torch.Tensor] = {}
        """Cached loss weights (1, h, w) at latent size by (view, flip), for views of cached datasets."""
        self.text_lookup: dict[str, Path | Conditioning] = {}
        self._preloaded: dict[int, torch.Tensor] = {}
        self._preloaded_masks: dict[int, torch.Tensor] = {}
        self._plan_memo: tuple[int, list[tuple[int, ...]]] | None = None
        self._warned: set[int] = set()
        self.constant_epochs = all(abs(r - round(r)) < 1e-9 for r in self.repeats)
        self._epoch_starts = [0]
        first = self._selection(0)
        self.batches_per_epoch = self._count_batches(first)
        """Batches in epoch 0; every epoch has as many unless a fractional weight varies bucket counts."""
        self.samples_per_epoch = sum(len(pairs) for pairs in first)
        for i, pairs in enumerate(first):
            if not pairs:
                logger.warning(
                    "datasets[%d]: num_repeats x weight gives no image per epoch; it never trains", i
                )
        if self.batches_per_epoch == 0:
            raise DatasetError(
                "the datasets give no images per epoch; raise datasets[].weight or num_repeats"
            )
        self._preload()
        logger.info("%s", self.report())

    # set-up -------------------------------------------------------------------------------------------
    def _prepare_captions(self, i: int) -> list[str]:
        cfg, src = self.configs[i], self.sources[i]
        if cfg.trigger_word is None and any(p in c for c in src.captions for p in PLACEHOLDERS):
            logger.warning(
                "datasets[%d]: captions contain [trigger] but trigger_word is not set; the placeholder is "
                "removed",
                i,
            )
        return [apply_trigger(c, cfg.trigger_word) for c in src.captions]

    def _make_views(self, i: int) -> list[int]:
        """Views of dataset i; images no bucket fits are skipped with one warning each."""
        cfg, src = self.configs[i], self.sources[i]
        step = cfg.bucket_step or self.size_multiple
        if step % self.size_multiple:
            raise DatasetError(
                f"datasets[{i}].bucket_step: {step} must be a multiple of the model's size multiple "
                f"{self.size_multiple}"
            )
        ids: list[int] = []
        unusable: list[str] = []
        for item, (width, height) in enumerate(src.sizes):
            seen: set[tuple[int, int]] = set()
            for resolution in cfg.resolutions:
                if cfg.enable_buckets:
                    size = assign_bucket(width, height, resolution, step, cfg.bucket_no_upscale)
                else:
                    size = (resolution, resolution)
                if size is None or size in seen:
                    continue
                seen.add(size)
                ids.append(len(self.views))
                self.views.append(View(i, item, size[0], size[1], resolution))
            if not seen:
                unusable.append(src.label(item))
                logger.warning(
                    "skipping %s: %dx%d px is smaller than the %d px bucket step on a side, and "
                    "bucket_no_upscale forbids enlarging it",
                    src.label(item),
                    width,
                    height,
                    step,
                )
        self.unusable += len(unusable)
        if not ids:
            raise DatasetError(
                f"datasets[{i}] ('{_dataset_name(cfg)}'): no usable image. bucket_no_upscale is on and all "
                f"{len(unusable)} readable images are smaller than the {step} px bucket step on a side at "
                f"resolution {cfg.resolution}; set bucket_no_upscale: false to enlarge them, lower "
                "bucket_step, or add larger images"
            )
        if unusable:
            logger.warning(
                "datasets[%d]: %d of %d images have no usable bucket and are skipped",
                i,
                len(unusable),
                len(src.sizes),
            )
        return ids

    def _group(self, view: View) -> tuple[int, int, bool, bool]:
        """Batches never mix sizes, nor cached with uncached latents / text embeddings."""
        cfg = self.configs[view.dataset]
        return view.width, view.height, cfg.cache_latents_to_disk, cfg.cache_text_embeddings

    def _repeats(self) -> list[float]:
        """Expected copies of each view per epoch: num_repeats x weight, regularisation sets scaled so that
        together they give as many samples as the training sets (kohya's balance)."""
        base = [cfg.num_repeats * cfg.weight for cfg in self.configs]
        expected = [len(ids) * r for ids, r in zip(self.view_ids, base, strict=True)]
        train = sum(n for n, cfg in zip(expected, self.configs, strict=True) if not cfg.is_reg)
        reg = sum(n for n, cfg in zip(expected, self.configs, strict=True) if cfg.is_reg)
        if reg == 0:
            return base
        return [r * train / reg if c.is_reg else r for r, c in zip(base, self.configs, strict=True)]

    def _preload(self) -> None:
        """Decode small datasets once into uint8 tensors (the final crop when cropping is centred)."""
        eligible = [
            v
            for v, view in enumerate(self.views)
            if not self.sources[view.dataset].streamed
            and not self.configs[view.dataset].cache_latents_to_disk
        ]
        total = 0
        for v in eligible:
            view = self.views[v]
            w, h = self.sources[view.dataset].sizes[view.item]
            scale = max(view.width / w, view.height / h)
            random_crop = self.configs[view.dataset].crop == "random"
            planes = 4 if self.masks.file(view.dataset, view.item) else 3
            area = round(w * scale) * round(h * scale) if random_crop else view.width * view.height
            total += planes * area
        if not eligible or total > PRELOAD_BYTES:
            return
        for v in eligible:
            view = self.views[v]
            centred = self.configs[view.dataset].crop == "center"
            image = self._decode(v)
            self._preloaded[v] = self._crop(image, v, None, flip=False).clone() if centred else image
            mask = self.masks.decode(view.dataset, view.item, view.width, view.height)
            if mask is not None:
                self._preloaded_masks[v] = self._crop(mask, v, None, flip=False).clone() if centred else mask

    def _decode(self, v: int) -> torch.Tensor:
        view = self.views[v]
        src = self.sources[view.dataset]
        return to_uint8_tensor(cover_resize(src.open(view.item), view.width, view.height))

    # the plan -----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.samples_per_epoch

    def epoch_start(self, epoch: int) -> int:
        """Index of the first micro-batch of ``epoch``."""
        if self.constant_epochs:
            return epoch * self.batches_per_epoch
        while len(self._epoch_starts) <= epoch:
            e = len(self._epoch_starts) - 1
            self._epoch_starts.append(self._epoch_starts[-1] + self._count_batches(self._selection(e)))
        return self._epoch_starts[epoch]

    def position(self, k: int) -> tuple[int, int]:
        """(epoch, batch within epoch) of micro-batch ``k``.

        With fractional weights the epochs before k are counted once (only their random subsets are
        drawn, no shuffles or images), which stays cheap even deep into a long run.
        """
        if self.constant_epochs:
            return divmod(k, self.batches_per_epoch)
        while self._epoch_starts[-1] <= k:
            self.epoch_start(len(self._epoch_starts))
        epoch = bisect.bisect_right(self._epoch_starts, k) - 1
        return epoch, k - self._epoch_starts[epoch]

    def _selection(self, epoch: int) -> list[list[tuple[int, int]]]:
        """Per dataset, the (copy number, view) pairs of this epoch: whole copies of every view, then a
        fresh random subset of round(fraction x views) for the fractional part of its repeats."""
        gen = _generator(self.seed, epoch, _SELECT)
        selection = []
        for ids, repeats in zip(self.view_ids, self.repeats, strict=True):
            whole = math.floor(repeats + 1e-9)
            extra = round((repeats - whole) * len(ids))
            pairs = [(c, v) for c in range(whole) for v in ids]
            if extra:
                subset = sorted(torch.randperm(len(ids), generator=gen)[:extra].tolist())
                pairs += [(whole, ids[j]) for j in subset]
            selection.append(pairs)
        return selection

    def _count_batches(self, selection: list[list[tuple[int, int]]]) -> int:
        """Batches a selection makes: per bucket ceil(count / batch_size), folder datasets pooled."""
        pooled: Counter[tuple[int, int, bool, bool]] = Counter()
        total = 0
        for i, pairs in enumerate(selection):
            counts = Counter(self.group_of[v] for _, v in pairs)
            if self.sources[i].streamed:
                total += sum(math.ceil(c / self.batch_size) for c in counts.values())
            else:
                pooled.update(counts)
        return total + sum(math.ceil(c / self.batch_size) for c in pooled.values())

    def plan(self, epoch: int) -> list[tuple[int, ...]]:
        """The batches (tuples of view ids) of one epoch, a pure function of (seed, epoch)."""
        if self._plan_memo is not None and self._plan_memo[0] == epoch:
            return self._plan_memo[1]
        selection = self._selection(epoch)
        gen = _generator(self.seed, epoch, _ORDER)
        pooled: dict[tuple[int, int, bool, bool], list[int]] = defaultdict(list)
        streams: list[list[tuple[int, ...]]] = []
        for i, pairs in enumerate(selection):
            if self.sources[i].streamed:
                streams.append(self._stream_batches(i, pairs, gen))
                continue
            for _, v in pairs:
                pooled[self.group_of[v]].append(v)
        batches: list[tuple[int, ...]] = []
        for key in sorted(pooled):
            members = pooled[key]
            order = torch.randperm(len(members), generator=gen).tolist()
            shuffled = [members[j] for j in order]
            batches += [
                tuple(shuffled[s : s + self.batch_size]) for s in range(0, len(shuffled), self.batch_size)
            ]
        batches = [batches[j] for j in torch.randperm(len(batches), generator=gen).tolist()]
        if streams:
            batches = self._interleave([batches, *streams], gen)
        self._plan_memo = (epoch, batches)
        return batches

    def _stream_batches(
        self, i: int, chosen: list[tuple[int, int]], gen: torch.Generator
    ) -> list[tuple[int, ...]]:
        """Shard order for streamed datasets: shards shuffled, samples shuffled inside each shard, and a
        batch emitted as soon as its bucket has batch_size samples, so reads stay within a shard or two."""
        src = self.sources[i]
        assert isinstance(src, ShardSource)
        shard_rank = torch.argsort(torch.randperm(len(src.shards), generator=gen)).tolist()
        member_rank = [torch.argsort(torch.randperm(n, generator=gen)).tolist() for n in src.shard_counts]

        def order(copy_view: tuple[int, int]) -> tuple[int, int, int, int]:
            copy, v = copy_view
            shard, rank = src.stream_position(self.views[v].item)
            return copy, shard_rank[shard], member_rank[shard][rank], v

        pending: dict[tuple[int, int, bool, bool], list[int]] = defaultdict(list)
        batches: list[tuple[int, ...]] = []
        for _, v in sorted(chosen, key=order):
            bucket = pending[self.group_of[v]]
            bucket.append(v)
            if len(bucket) == self.batch_size:
                batches.append(tuple(bucket))
                bucket.clear()
        batches += [tuple(pending[key]) for key in sorted(pending) if pending[key]]
        return batches

    @staticmethod
    def _interleave(lists: list[list[tuple[int, ...]]], gen: torch.Generator) -> list[tuple[int, ...]]:
        """Random merge that keeps each list's own order (a streamed dataset's shard order)."""
        labels = [n for n, batches in enumerate(lists) for _ in batches]
        labels = [labels[j] for j in torch.randperm(len(labels), generator=gen).tolist()]
        cursors = [0] * len(lists)
        merged = []
        for n in labels:
            merged.append(lists[n][cursors[n]])
            cursors[n] += 1
        return merged

    # one view ---------------------------------------------------------------------------------------------
    def flips(self, v: int, epoch: int) -> bool:
        """Whether view v is mirrored this epoch; independent of worker count and access order."""
        if not self.configs[self.views[v].dataset].flip_x:
            return False
        return bool(_rng(self.seed, epoch, v, _FLIP).random() < 0.5)

    def caption(self, v: int, epoch: int | None) -> str:
        """The caption as trained this epoch (trigger applied; tags shuffled when configured)."""
        view = self.views[v]
        cfg = self.configs[view.dataset]
        text = self.captions[view.dataset][view.item]
        if cfg.shuffle_tokens and epoch is not None:
            text = shuffle_tags(text, cfg.keep_tokens, _rng(self.seed, epoch, v, _TAGS))
        return text

    def _crop_position(self, v: int, epoch: int | None) -> tuple[float, float] | None:
        """Random-crop fractions of view v this epoch, drawn per (seed, epoch, view); None: centred (also
        for ``epoch=None``, which is how the latent cache encodes views)."""
        if self.configs[self.views[v].dataset].crop != "random" or epoch is None:
            return None
        x, y = _rng(self.seed, epoch, v, _CROP).random(2).tolist()
        return x, y

    def view_pixels(self, v: int, epoch: int | None, flip: bool) -> torch.Tensor:
        """uint8 (3, H, W) crop of view v; random crops are drawn per (seed, epoch, view)."""
        image = self._preloaded.get(v)
        return self._crop(self._decode(v) if image is None else image, v, epoch, flip)

    def view_mask(self, v: int, epoch: int | None, flip: bool) -> torch.Tensor:
        """uint8 (1, H, W) loss mask of view v, cropped and flipped exactly as :meth:`view_pixels` is."""
        view = self.views[v]
        mask = self._preloaded_masks.get(v)
        if mask is None:
            mask = self.masks.decode(view.dataset, view.item, view.width, view.height)
        if mask is None:
            raise DatasetError(f"{self.label(v)} has no loss mask")
        return self._crop(mask, v, epoch, flip)

    def _crop(self, image: torch.Tensor, v: int, epoch: int | None, flip: bool) -> torch.Tensor:
        """View v's crop (and flip) of an image or mask already resized for it (an already cropped one, a
        preloaded centre crop, passes through unchanged as its offsets are 0)."""
        view = self.views[v]
        position = self._crop_position(v, epoch)
        left, top = crop_offsets((image.shape[2], image.shape[1]), view.width, view.height, position)
        image = image[:, top : top + view.height, left : left + view.width]
        return image.flip(-1) if flip else image

    def size_and_crop(self, v: int, epoch: int | None, flip: bool) -> tuple[int, int, int, int]:
        """(original height, original width, crop top, crop left) of view v as :meth:`view_pixels` crops it.

        SDXL was trained conditioned on these (Podell et al. 2023, section 2.2), as kohya sd-scripts and
        SimpleTuner train it: the source image's size before the bucket resize, and the crop's offset in
        the resized image. A flipped crop's left offset is measured from the mirrored image's left edge
        (``resized width - left - crop width``), as kohya does, so the model sees where the crop lies in
        the picture it was actually shown. Computed from the image's stored size, never by decoding, so
        cached latents (always centre crops, ``epoch=None``) get the same values as the pixels they encode.
        """
        view = self.views[v]
        width, height = self.sources[view.dataset].sizes[view.item]
        resized = cover_size((width, height), view.width, view.height)
        left, top = crop_offsets(resized, view.width, view.height, self._crop_position(v, epoch))
        if flip:
            left = resized[0] - left - view.width
        return height, width, top, left

    def label(self, v: int) -> str:
        view = self.views[v]
        return self.sources[view.dataset].label(view.item)

    # batches ------------------------------------------------------------------------------------------
    def batch(self, k: int) -> Batch:
        """Micro-batch k. An image that cannot be read any more (changed on disk, a corrupt tar member) is
        left out of its batch with a warning rather than stopping the run."""
        epoch, b = self.position(k)
        ids = self.plan(epoch)[b]
        _, _, latents_cached, text_cached = self.group_of[ids[0]]
        flips = [self.flips(v, epoch) for v in ids]
        tensors: list[torch.Tensor] = []
        kept: list[int] = []
        for v, flip in zip(ids, flips, strict=True):
            try:
                tensors.append(self._latent(v, flip) if latents_cached else self.view_pixels(v, epoch, flip))
                kept.append(v)
            except Exception as exc:
                if v not in self._warned:
                    self._warned.add(v)
                    logger.warning(
                        "leaving %s out of its batch: %s: %s", self.label(v), type(exc).__name__, exc
                    )
        if not kept:
            raise DatasetError(
                f"none of the {len(ids)} images of micro-batch {k} could be read (first: "
                f"{self.label(ids[0])}); check the files, or delete the dataset's .eri_cache folder if the "
                "cache is damaged"
            )
        captions = [self.caption(v, epoch) for v in kept]
        stacked = torch.stack(tensors)
        flip_of = dict(zip(ids, flips, strict=True))
        # cached latents are centre crops (see data/cache.py), so their geometry is drawn with epoch=None
        geometry = torch.tensor(
            [self.size_and_crop(v, None if latents_cached else epoch, flip_of[v]) for v in kept],
            dtype=torch.int64,
        )
        batch = Batch(
            pixels=None if latents_cached else stacked.float().div_(127.5).sub_(1.0),
            captions=captions,
            dropout_rates=torch.tensor(
                [self.configs[self.views[v].dataset].caption_dropout_rate for v in kept]
            ),
            epoch=epoch,
            loss_weights=torch.tensor([self.configs[self.views[v].dataset].loss_weight for v in kept]),
            latents=stacked if latents_cached else None,
            original_sizes=geometry[:, :2],
            crops=geometry[:, 2:],
            loss_mask=batch_loss_mask(self, kept, [flip_of[v] for v in kept], epoch, latents_cached),
        )
        if text_cached:
            rows = [self._text(c) for c in captions]
            batch.cond = {name: torch.stack([r[name] for r in rows]) for name in rows[0]}
            batch.empty_cond = self._text("")
        return batch

    def _latent(self, v: int, flip: bool) -> torch.Tensor:
        entry = self.latent_lookup.get((v, flip))
        if entry is None:
            raise DatasetError(f"no cached latent for {self.label(v)}; the cache was not prepared")
        return load_file(entry)["latent"] if isinstance(entry, Path) else entry

    def _text(self, caption: str) -> Conditioning:
        entry = self.text_lookup.get(caption)
        if entry is None:
            raise DatasetError(
                f"no cached text embedding for caption {caption!r}; the cache was not prepared"
            )
        return load_file(entry) if isinstance(entry, Path) else entry

    def iterate(
        self, start: int, stop: int, num_workers: int = 0, pin_memory: bool = False
    ) -> Iterator[Batch]:
        """Micro-batches start..stop-1 in order; with workers, each builds whole batches in parallel and
        the DataLoader hands them back in sampler order, so the sequence is the same for any worker count.
        ``pin_memory`` (CUDA training) page-locks each batch so its copy to the GPU can be asynchronous."""
        if num_workers == 0:
            for k in range(start, stop):
                yield self.batch(k).pin_memory() if pin_memory else self.batch(k)
            return
        loader = torch.utils.data.DataLoader(
            _Batches(self),
            batch_size=None,
            sampler=range(start, stop),
            num_workers=num_workers,
            collate_fn=_identity,
            worker_init_fn=_one_thread,
            pin_memory=pin_memory,
        )
        yield from loader

    # reporting ----------------------------------------------------------------------------------------
    def report(self) -> str:
        """Bucket counts per dataset and the epoch size, as printed at the start of training."""
        lines = [
            f"data: {len(self.configs)} dataset(s), {self.samples_per_epoch} samples per epoch in "
            f"{self.batches_per_epoch} batches of up to {self.batch_size} (sizes in multiples of "
            f"{self.size_multiple} px)"
        ]
        for i, cfg in enumerate(self.configs):
            counts = Counter((self.views[v].width, self.views[v].height) for v in self.view_ids[i])
            kind = " (regularisation)" if cfg.is_reg else ""
            lines.append(
                f"  datasets[{i}]{kind} {_dataset_name(cfg)}: {len(self.sources[i])} images, "
                f"{len(self.view_ids[i])} views at resolution {cfg.resolution}, "
                f"x{self.repeats[i]:.3g} per epoch, {'buckets' if cfg.enable_buckets else 'square crops'}:"
            )
            if self.masks.count(i):
                lines.append(f"    loss masks: {self.masks.count(i)} of {len(self.sources[i])} images")
            lines += format_bucket_counts(counts, indent="    ")
        if self.skipped or self.unusable:
            lines.append(f"  skipped: {self.skipped} unreadable, {self.unusable} without a usable bucket")
        return "\n".join(lines)


class _Batches(torch.utils.data.Dataset):
    """Map-style view of TrainingData for DataLoader workers: item k is micro-batch k."""

    def __init__(self, data: TrainingData) -> None:
        self.data = data

    def __getitem__(self, k: int) -> Batch:
        return self.data.batch(k)


def _identity(batch: Any) -> Any:
    return batch


def _one_thread(_worker: int) -> None:
    """Workers decode images; torch's intra-op threads there would only fight the trainer for cores."""
    torch.set_num_threads(1)
