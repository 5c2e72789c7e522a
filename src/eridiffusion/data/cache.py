"""Latent and text-embedding caches on disk, so the VAE and text encoders run once per image and caption.

Layout (``datasets[].cache_dir``, default ``.eri_cache`` inside the dataset folder)::

    latents/<model id>/<ab>/<key>.safetensors   {"latent": (C, h, w)}
    text/<model id>/<ab>/<key>.safetensors      one row of the family's Conditioning
    masks/<ab>/<key>.safetensors                 {"mask": (1, h, w)} loss weights at latent size
    hashes.json                                  content hashes by (path, size, mtime), to skip re-reading

The model id hashes the weights of the components that produce the entry (the naming contract of
:meth:`eridiffusion.models.protocol.ModelFamily.modules`: ``text_encoder*`` for text, the rest except
``denoiser`` for latents) with the family name and latent shape. A latent key hashes the image's bytes, its
training size and crop, and the flip; a text key hashes the caption. A changed image, caption, size or model
therefore maps to a new file and the stale one is simply not read (delete the folder to reclaim the space).
A loss mask's key hashes the mask file's bytes, the view's and the latent's sizes, the flip and the
dataset's mask settings (``unmasked_weight``, ``normalize_masked_area_loss``, ``alpha_mask``); it needs
no model, so only a changed mask or setting (never a changed model) recomputes it.
Files are written under a temporary name and renamed, so an interrupted run never leaves half an entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from eridiffusion.data.folder import FolderSource, file_digest
from eridiffusion.data.loader import PRELOAD_BYTES, TrainingData
from eridiffusion.data.masks import resize_loss_mask, view_weights
from eridiffusion.models.protocol import ModelFamily
from eridiffusion.progress import progress_bar

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
"""Bump when decoding, resizing or cropping changes, so old entries stop matching."""


def module_fingerprint(label: str, modules: dict[str, nn.Module]) -> str:
    """Hash of ``label`` and every tensor (name, dtype, shape, bytes) of the modules, in name order."""
    digest = hashlib.blake2b(label.encode(), digest_size=12)
    for name in sorted(modules):
        for key, tensor in sorted(modules[name].state_dict().items()):
            t = tensor.detach().to("cpu").contiguous()
            digest.update(f"{name}.{key}|{t.dtype}|{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def encoder_names(family: ModelFamily) -> tuple[list[str], list[str]]:
    """(image encoder components, text encoder components) by the protocol's naming contract."""
    names = list(family.modules())
    text = [n for n in names if n.startswith("text_encoder")]
    image = [n for n in names if n != "denoiser" and n not in text]
    return image, text


def _entry_path(root: Path, kind: str, model_id: str, key: str) -> Path:
    return root / kind / model_id / key[:2] / f"{key}.safetensors"


def _key(*parts: object) -> str:
    return hashlib.blake2b(
        "|".join(str(p) for p in (CACHE_VERSION, *parts)).encode(), digest_size=20
    ).hexdigest()


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _cache_root(data: TrainingData, i: int) -> Path:
    cfg = data.configs[i]
    return Path(cfg.cache_dir) if cfg.cache_dir else data.sources[i].default_cache_dir()


def _load_memo(root: Path) -> dict[str, str]:
    try:
        return json.loads((root / "hashes.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _save_memo(root: Path, memo: dict[str, str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".hashes.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(memo), encoding="utf-8")
    os.replace(tmp, root / "hashes.json")


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _maybe_load_into_memory(lookup: dict, field: str | None) -> None:
    """Small caches are read once into memory so a step costs no file opens (sized from one entry)."""
    paths = [entry for entry in lookup.values() if isinstance(entry, Path)]
    if not paths:
        return
    sample = load_file(paths[0])
    if sum(t.numel() * t.element_size() for t in sample.values()) * len(lookup) > PRELOAD_BYTES:
        return
    for key, entry in lookup.items():
        if isinstance(entry, Path):
            tensors = load_file(entry)
            lookup[key] = tensors[field] if field is not None else tensors


@torch.no_grad()
def build_latent_cache(data: TrainingData, family: ModelFamily, device: torch.device, progress: bool) -> int:
    """Encode every view of the datasets with ``cache_latents_to_disk`` (both flips when ``flip_x``) that is
    not on disk yet, in same-size batches on ``device``; returns how many entries were computed."""
    image_names, _ = encoder_names(family)
    modules = family.modules()
    m = family.size_multiple()
    model_id = module_fingerprint(
        f"{family.arch}|{family.latent_shape(m, m)}", {n: modules[n] for n in image_names}
    )
    todo: list[tuple[int, bool, Path]] = []
    for i, cfg in enumerate(data.configs):
        if not cfg.cache_latents_to_disk:
            continue
        source = data.sources[i]
        if not isinstance(source, FolderSource):
            raise ValueError(f"datasets[{i}]: only folder datasets can cache latents")
        root = _cache_root(data, i)
        memo = _load_memo(root)
        for v in data.view_ids[i]:
            view = data.views[v]
            digest = source.digest(view.item, memo)
            for flip in (False, True) if cfg.flip_x else (False,):
                key = _key(digest, f"{view.width}x{view.height}", "center", f"flip={flip}")
                path = _entry_path(root, "latents", model_id, key)
                data.latent_lookup[(v, flip)] = path
                if not path.is_file():
                    todo.append((v, flip, path))
            _cache_masks(data, family, v, root, memo)
        _save_memo(root, memo)
    by_size: dict[tuple[int, int], list[tuple[int, bool, Path]]] = defaultdict(list)
    for entry in todo:
        view = data.views[entry[0]]
        by_size[(view.width, view.height)].append(entry)
    bar = progress_bar(len(todo), "caching latents", progress and bool(todo))
    for size in sorted(by_size):
        for chunk in _chunks(by_size[size], data.batch_size):
            pixels = torch.stack([data.view_pixels(v, None, flip) for v, flip, _ in chunk])
            latents = family.encode_images((pixels.float() / 127.5 - 1.0).to(device))
            for (_, _, path), latent in zip(chunk, latents, strict=True):
                _write(path, {"latent": latent})
            bar.update(len(chunk))
    bar.close()
    _maybe_load_into_memory(data.latent_lookup, "latent")
    _maybe_load_into_memory(data.mask_lookup, "mask")
    return len(todo)


def _cache_masks(data: TrainingData, family: ModelFamily, v: int, root: Path, memo: dict[str, str]) -> None:
    """Cache view v's loss weights (both flips when flipped) at latent size, if it has a mask.

    Written right away rather than batched: a mask costs a PNG decode and a resize, no model.
    """
    view = data.views[v]
    mask = data.masks.file(view.dataset, view.item)
    if mask is None:
        return
    cfg = data.configs[view.dataset]
    latent_size = tuple(family.latent_shape(view.height, view.width)[1:])
    for flip in (False, True) if cfg.flip_x else (False,):
        settings = (cfg.unmasked_weight, cfg.normalize_masked_area_loss, f"alpha={cfg.alpha_mask}")
        size = f"{view.width}x{view.height}"
        key = _key("mask", file_digest(mask, memo), size, latent_size, f"flip={flip}", *settings)
        path = root / "masks" / key[:2] / f"{key}.safetensors"
        data.mask_lookup[(v, flip)] = path
        if not path.is_file():
            _write(path, {"mask": resize_loss_mask(view_weights(data, v, None, flip), latent_size)})


@torch.no_grad()
def build_text_cache(data: TrainingData, family: ModelFamily, device: torch.device, progress: bool) -> int:
    """Encode every distinct caption of the datasets with ``cache_text_embeddings``, plus the empty prompt
    (caption dropout trains on it), in batches; returns how many entries were computed."""
    _, text_names = encoder_names(family)
    modules = family.modules()
    trained = [n for n in text_names if any(p.requires_grad for p in modules[n].parameters())]
    if trained:
        raise ValueError(
            f"datasets[].cache_text_embeddings: the text encoder ({', '.join(trained)}) is being trained, so "
            "its embeddings change every step; set train.train_text_encoder: false or turn the cache off"
        )
    model_id = module_fingerprint(family.arch, {n: modules[n] for n in text_names})
    todo: dict[str, Path] = {}
    for i, cfg in enumerate(data.configs):
        if not cfg.cache_text_embeddings:
            continue
        root = _cache_root(data, i)
        captions = {data.caption(v, None) for v in data.view_ids[i]} | {""}
        for caption in sorted(captions):
            if caption in data.text_lookup:
                continue
            path = _entry_path(root, "text", model_id, _key(caption))
            data.text_lookup[caption] = path
            if not path.is_file():
                todo[caption] = path
    pending = sorted(todo)
    bar = progress_bar(len(pending), "caching text", progress and bool(pending))
    for chunk in _chunks(pending, data.batch_size):
        cond = family.encode_prompt(chunk)
        for row, caption in enumerate(chunk):
            _write(todo[caption], {k: v[row] for k, v in cond.items()})
        bar.update(len(chunk))
    bar.close()
    _maybe_load_into_memory(data.text_lookup, None)
    return len(pending)


class EncoderOffload:
    """Moves encoder components off the training device once every batch comes from the cache, and back
    for the moments that still need them (sample grids decode latents and encode the sample prompts)."""

    def __init__(self, family: ModelFamily, names: list[str], device: torch.device) -> None:
        self.family = family
        self.names = names
        self.device = device

    def _move(self, device: torch.device | str) -> None:
        modules = self.family.modules()
        for name in self.names:
            modules[name].to(device)

    def offload(self) -> None:
        if self.names and self.device.type != "cpu":
            self._move("cpu")
            logger.info(
                "moved %s off %s: every batch comes from the cache", ", ".join(self.names), self.device
            )

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """The offloaded components back on the training device for the duration of the block."""
        if not self.names or self.device.type == "cpu":
            yield
            return
        self._move(self.device)
        try:
            yield
        finally:
            self._move("cpu")


def prepare_caches(
    data: TrainingData, family: ModelFamily, device: torch.device, progress: bool = True
) -> EncoderOffload:
    """Build (or reuse) the configured caches on ``device`` and offload what no batch needs any more."""
    image_names, text_names = encoder_names(family)
    offload: list[str] = []
    if any(cfg.cache_latents_to_disk for cfg in data.configs):
        computed = build_latent_cache(data, family, device, progress)
        logger.info("latent cache: %d computed, %d reused", computed, len(data.latent_lookup) - computed)
        if all(data.configs[v.dataset].cache_latents_to_disk for v in data.views):
            offload += image_names
    if any(cfg.cache_text_embeddings for cfg in data.configs):
        computed = build_text_cache(data, family, device, progress)
        logger.info("text cache: %d computed, %d reused", computed, len(data.text_lookup) - computed)
        if all(data.configs[v.dataset].cache_text_embeddings for v in data.views):
            offload += text_names
    modules = family.modules()
    offload = [n for n in offload if not any(p.requires_grad for p in modules[n].parameters())]
    result = EncoderOffload(family, offload, device)
    result.offload()
    return result
