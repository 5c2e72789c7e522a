"""One micro-batch as the training step receives it, and how it is split across processes and
accumulation steps without changing which rows each one trains."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from eridiffusion.models.protocol import Conditioning


@dataclass
class Batch:
    """One micro-batch, all images the same size. Either ``pixels`` or (cached) ``latents`` is set, and
    ``cond`` holds cached text embeddings when the captions' are cached (else the loop encodes captions)."""

    pixels: torch.Tensor | None
    captions: list[str]
    dropout_rates: torch.Tensor
    epoch: int
    loss_weights: torch.Tensor
    latents: torch.Tensor | None = None
    cond: Conditioning | None = None
    empty_cond: Conditioning | None = None
    original_sizes: torch.Tensor | None = None
    """(B, 2) int64 (height, width) of each source image before the bucket resize, for SDXL's size
    conditioning; None when the batch does not come from image files (tests, hand-built batches)."""
    crops: torch.Tensor | None = None
    """(B, 2) int64 (top, left) of each crop in the resized image's pixels, mirrored with a horizontal flip
    (kohya's convention), for SDXL's crop conditioning; None together with ``original_sizes``."""
    loss_mask: torch.Tensor | None = None
    """(B, 1, H, W) float per-pixel loss weights from the images' masks (see data/masks.py), at pixel or
    latent size; None when no image of the batch has a mask, so unmasked training is untouched."""

    global_size: int | None = None
    """Samples in the whole micro-batch when this is one process's share of it (multi-process training):
    random draws (noise, timesteps, caption dropout) are made for every row of the whole batch and each
    process takes its own rows, so N processes see exactly what one process with N x the batch would."""
    offset: int = 0
    """Index of this share's first row inside the whole micro-batch."""
    shares: int = 1
    """How many processes split the whole micro-batch."""

    def __len__(self) -> int:
        return len(self.captions)

    def share(self, rank: int, world: int) -> Batch:
        """Process ``rank``'s rows of this micro-batch: a contiguous, near-even split.

        A process whose share would be empty (a bucket's last batch smaller than the number of processes)
        gets the first row with loss weight 0, so every process runs the same forward/backward and the
        padding row adds nothing to the gradient.
        """
        n = len(self)
        start, stop = n * rank // world, n * (rank + 1) // world
        if start == stop:
            padded = self._rows(0, 1, n, world)
            return dataclasses.replace(padded, loss_weights=padded.loss_weights * 0.0)
        return self._rows(start, stop, n, world)

    def part(self, k: int, parts: int) -> Batch:
        """Part ``k`` of ``parts`` contiguous pieces of these rows, drawn as part of the same batch: the
        pieces' losses add up to this batch's loss (how an out-of-memory step is redone in smaller pieces)."""
        if parts == 1:
            return self
        n = len(self)
        start, stop = n * k // parts, n * (k + 1) // parts
        whole = self.global_size or n
        return self._rows(start, stop, whole, self.shares, offset=self.offset + start)

    def _rows(self, start: int, stop: int, whole: int, shares: int, offset: int | None = None) -> Batch:
        rows = slice(start, stop)

        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows]

        return dataclasses.replace(
            self,
            pixels=cut(self.pixels),
            captions=self.captions[rows],
            dropout_rates=self.dropout_rates[rows],
            loss_weights=self.loss_weights[rows],
            latents=cut(self.latents),
            cond=None if self.cond is None else {k: v[rows] for k, v in self.cond.items()},
            original_sizes=cut(self.original_sizes),
            crops=cut(self.crops),
            loss_mask=cut(self.loss_mask),
            global_size=whole,
            offset=start if offset is None else offset,
            shares=shares,
        )

    def pin_memory(self) -> Batch:
        """A copy whose tensors sit in page-locked memory, so the copy to a GPU can overlap compute
        (DataLoader calls this when ``pin_memory`` is on)."""

        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.pin_memory()

        cond = None if self.cond is None else {k: v.pin_memory() for k, v in self.cond.items()}
        return dataclasses.replace(
            self, pixels=pin(self.pixels), latents=pin(self.latents), cond=cond, loss_mask=pin(self.loss_mask)
        )

    def size_conditioning(self) -> torch.Tensor | None:
        """(B, 4) float rows (original h, original w, crop top, crop left), or None without the metadata.

        The loop passes this to every family as the ``size_conditioning`` entry of its ``Conditioning``;
        only families trained with such micro-conditioning (SDXL) read it, so the trainer needs no
        family branch.
        """
        if self.original_sizes is None or self.crops is None:
            return None
        return torch.cat([self.original_sizes, self.crops], dim=1).float()

    def cached_conditioning(self, drop: torch.Tensor, device: torch.device) -> Conditioning:
        """The cached text embeddings on ``device``, with dropped rows swapped for the empty prompt's
        (caption dropout for classifier-free guidance without running the text encoder)."""
        if self.cond is None:
            raise ValueError("this batch has no cached text embeddings")
        if not bool(drop.any()):
            return {k: v.to(device) for k, v in self.cond.items()}
        if self.empty_cond is None:
            raise ValueError("caption dropout needs the empty prompt's cached embedding")
        out: Conditioning = {}
        for k, v in self.cond.items():
            mask = drop.view(-1, *([1] * (v.dim() - 1)))
            out[k] = torch.where(mask, self.empty_cond[k].unsqueeze(0).to(v.dtype), v).to(device)
        return out
