"""The one generation API the CLI and the server share: named models, an LRU model cache, LoRA by path.

Adapter files are merged into weights (:func:`eridiffusion.networks.apply_adapter_files`), which changes the
model in place. So a request with LoRAs never touches the cached base model: each distinct
(model, LoRA set) pair is loaded fresh from disk, merged once and cached as its own entry, evicted like any
other. Merging back out (subtracting the delta) would drift the base weights a little on every request;
a fresh load costs one disk read and keeps every cached model bit-exact.
ControlNets are never merged: they run beside the model, so they are cached on their own
(:class:`ControlNetCache`) and one loaded ControlNet serves every model of its architecture.

Schedulers hold per-run state and are not thread-safe; :func:`~eridiffusion.inference.generate.sample`
builds a fresh one per call, so several threads may generate from one cached model at once.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from eridiffusion.device import resolve_device
from eridiffusion.inference.controlnet import require_controlnet_support
from eridiffusion.inference.generate import (
    GenerateRequest,
    Preview,
    StepCallback,
    a1111_parameters,
    generate_pixels,
    to_pil,
)
from eridiffusion.inference.hashing import lora_shorthash
from eridiffusion.inference.lora_tags import LoraTag, split_lora_tags
from eridiffusion.inference.memory import MemoryOptions, apply_memory_options, offload_of
from eridiffusion.inference.samplers import default_sampler
from eridiffusion.models import detect_arch, load_family
from eridiffusion.models.protocol import ModelFamily
from eridiffusion.networks import AdapterSpec, apply_adapter_files
from eridiffusion.networks.peft_scales import adapter_weights_file

LoraSpec = AdapterSpec
"""An adapter file and its denoiser and text-encoder multipliers (A1111's ``<lora:name:te:unet>``)."""


def model_bytes(family: ModelFamily) -> int:
    """Parameter and buffer bytes of every component: what the cache's memory budget counts."""
    total = 0
    for module in family.modules().values():
        for t in (*module.parameters(), *module.buffers()):
            total += t.numel() * t.element_size()
    return total


def discover_models(paths: list[Path]) -> dict[str, Path]:
    """Name -> path for each model in ``paths``: a path that is a model itself, or the models one level
    inside a folder of models. Names are folder names or file stems, as A1111 lists checkpoints."""
    found: dict[str, Path] = {}
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"model path '{path}' does not exist")
        candidates = [path]
        try:
            detect_arch(path)
        except ValueError:
            candidates = sorted(p for p in path.iterdir() if p.is_dir() or p.suffix == ".safetensors")
        for c in candidates:
            try:
                detect_arch(c)
            except ValueError:
                continue
            found[c.stem if c.is_file() else c.name] = c
    if not found:
        raise ValueError(f"no model found in {[str(p) for p in paths]}")
    return found


def pil_to_pixels(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """An img2img start image as (3, height, width) pixels in [-1, 1], stretched to the requested size
    (A1111's default "Just resize")."""
    rgb = image.convert("RGB").resize((width, height), Image.BICUBIC)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float() / 127.5 - 1


def pil_to_mask(image: Image.Image, width: int, height: int, invert: bool = False) -> torch.Tensor:
    """An inpainting mask as (1, height, width) in {0, 1}: white (1) is repainted, black kept, as in A1111;
    nearest resizing and a 0.5 threshold keep it binary, so the kept area stays exactly the start image."""
    grey = np.asarray(image.convert("L").resize((width, height), Image.NEAREST))
    mask = torch.from_numpy(grey >= 128).float()[None]
    return 1 - mask if invert else mask


class UnknownName(FileNotFoundError):
    """A model, LoRA or ControlNet name that names nothing loadable here. The message is the same whether
    the name is missing, outside the configured folders or not a model at all, and never shows a server
    path: a client learns nothing about the disk from it (a server answers 404)."""

    def __init__(self, kind: str, name: str, hint: str = "") -> None:
        shown = name if len(name) <= 120 else name[:120] + "..."
        super().__init__(f"unknown {kind} {shown!r}" + (f"; {hint}" if hint else ""))
        self.kind = kind


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path``, symlinks and ``..`` resolved, lies inside ``folder`` (also resolved)."""
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError, ValueError):  # symlink loops, NUL bytes
        return False


def _is_lora(path: Path) -> bool:
    try:
        return path.suffix == ".safetensors" and path.is_file()
    except (OSError, ValueError):  # a name too long for the file system, NUL bytes
        return False


def _is_controlnet(path: Path) -> bool:
    """A diffusers ControlNet folder or a single ``.safetensors`` file."""
    try:
        return (path.is_dir() and (path / "config.json").is_file()) or _is_lora(path)
    except (OSError, ValueError):
        return False


def _missing_path(kind: str, name: str, allow_paths: bool) -> None:
    """The CLI's message for a path it was given that is not there (a server never reaches this)."""
    path = Path(name)
    if allow_paths and (len(path.parts) > 1 or path.suffix == ".safetensors"):
        raise FileNotFoundError(f"{kind} '{path}' does not exist")


def _find_inside(
    folders: list[Path], name: str, suffixes: tuple[str, ...], accept: Callable[[Path], bool]
) -> Path | None:
    """``name`` (a path relative to one of ``folders``, optionally without its suffix) resolved with
    symlinks and ``..``, when it stays inside that folder and ``accept`` takes it; else None. An absolute
    name joins to itself and so lands outside every folder."""
    if not name or "\0" in name:
        return None
    for folder in folders:
        root = folder.resolve()
        for suffix in suffixes:
            if suffix and name.endswith(suffix):
                continue
            try:
                candidate = (root / (name + suffix)).resolve()
                if candidate.is_relative_to(root) and accept(candidate):
                    return candidate
            except (OSError, RuntimeError, ValueError):
                continue
    return None


class ModelCache:
    """Loaded models by (model path, LoRA set), least recently used first out.

    Evicts until the new entry fits ``budget_bytes`` and at most ``max_entries`` remain; a single model
    larger than the budget is still served (alone), since refusing it would make the server useless.
    """

    def __init__(
        self,
        device: torch.device,
        budget_bytes: int | None = None,
        max_entries: int = 2,
        loader: Callable[[Path], ModelFamily] = load_family,
        memory: MemoryOptions | None = None,
    ) -> None:
        self.device = device
        """Where models run; with ``memory.cpu_offload`` they are stored on the CPU and visit it."""
        self.memory = memory or MemoryOptions()
        self.budget_bytes = budget_bytes
        self.max_entries = max(1, max_entries)
        self._loader = loader
        self._entries: OrderedDict[tuple[str, tuple[LoraSpec, ...]], tuple[ModelFamily, int]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self._entries.values())

    def loaded(self) -> list[tuple[str, tuple[LoraSpec, ...]]]:
        return list(self._entries)

    def get(self, path: Path, loras: tuple[LoraSpec, ...] = ()) -> ModelFamily:
        key = (str(path.resolve()), loras)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key][0]
            family = self._loader(path)
            apply_adapter_files(family, list(loras))
            family.to(torch.device("cpu") if self.memory.cpu_offload else self.device)
            for module in family.modules().values():
                module.eval()
            apply_memory_options(family, self.memory, self.device)
            size = model_bytes(family)
            while self._entries and (
                len(self._entries) >= self.max_entries
                or (self.budget_bytes is not None and self.total_bytes + size > self.budget_bytes)
            ):
                self._entries.popitem(last=False)
            self._entries[key] = (family, size)
            return family


class ControlNetCache:
    """Loaded ControlNets by (file or folder, model architecture), least recently used first out.

    A ControlNet is about a third of its model's size, so a few are kept beside the model cache (not
    counted in its budget); the architecture is part of the key because a single file takes its shape
    from the model it is loaded for."""

    def __init__(self, device: torch.device, max_entries: int = 2) -> None:
        self.device = device
        self.max_entries = max(1, max_entries)
        self._entries: OrderedDict[tuple[str, str], nn.Module] = OrderedDict()
        self._lock = threading.Lock()

    def loaded(self) -> list[tuple[str, str]]:
        return list(self._entries)

    def get(self, family: ModelFamily, path: Path) -> nn.Module:
        key = (str(path.resolve()), family.arch)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            net = require_controlnet_support(family).load_controlnet(path).to(self.device).eval()
            while len(self._entries) >= self.max_entries:
                self._entries.popitem(last=False)
            self._entries[key] = net
            return net


@dataclass
class GenerationResult:
    images: list[Image.Image]
    prompts: list[str]
    seeds: list[int]
    parameters: list[str]
    """A1111 ``parameters`` text per image, for the PNG chunk and API responses."""
    request: GenerateRequest
    """The request as run: sampler, size and model name filled in."""


@dataclass(frozen=True)
class LoraPlan:
    """What a request's LoRAs change: the merge, and how the infotext reproduces it in A1111."""

    prompts: list[str]
    """Without ``<lora:...>`` tags: what the text encoders see."""
    infotext_prompts: list[str]
    """As sent, plus a tag for each LoRA given outside the prompt."""
    specs: tuple[LoraSpec, ...]
    hashes: str
    """A1111's ``Lora hashes`` value, ``name: shorthash, ...``; empty without LoRAs."""


class Generator:
    """Generate from named local models; safe to call from several threads."""

    def __init__(
        self,
        models: Mapping[str, Path],
        device: str = "auto",
        memory_budget_bytes: int | None = None,
        max_models: int = 2,
        lora_dirs: list[Path] | None = None,
        controlnet_dirs: list[Path] | None = None,
        max_controlnets: int = 2,
        memory: MemoryOptions | None = None,
        allow_paths: bool = False,
        model_roots: list[Path] | None = None,
    ) -> None:
        if not models:
            raise ValueError("Generator needs at least one model")
        self.models = dict(models)
        self.default_model = next(iter(self.models))
        self.lora_dirs = list(lora_dirs or [])
        self.controlnet_dirs = list(controlnet_dirs or [])
        self.allow_paths = allow_paths
        """Also accept LoRA / ControlNet file paths (the CLI's user owns the disk); never for a server."""
        self.model_roots = list(model_roots or [])
        """Where ``models`` were discovered (:func:`discover_models`), for :meth:`refresh_models`."""
        self.memory = memory or MemoryOptions()
        self.cache = ModelCache(resolve_device(device), memory_budget_bytes, max_models, memory=self.memory)
        self._offload_lock = threading.Lock()
        """CPU offload moves shared modules between devices: offloaded generations run one at a time."""
        self.controlnets = ControlNetCache(self.cache.device, max_controlnets)

    def refresh_models(self) -> dict[str, Path]:
        """Discover the models in ``model_roots`` again (new checkpoints appear, removed ones go; the
        default stays unless it went). Without roots the models given at construction stay as they are."""
        if self.model_roots:
            found = discover_models(self.model_roots)
            self.models = found
            if self.default_model not in found:
                self.default_model = next(iter(found))
        return self.models

    def model_path(self, name: str | None) -> tuple[str, Path]:
        name = name or self.default_model
        if name not in self.models:
            raise UnknownName("model", name, f"available: {sorted(self.models)}")
        return name, self.models[name]

    def list_controlnets(self) -> dict[str, Path]:
        """Name -> path of the ControlNets in the ControlNet folders: diffusers folders (by folder name)
        and single ``.safetensors`` files (by stem), as A1111's extension lists its models. Entries whose
        real path (symlinks resolved) lies outside their folder are left out: they could not be loaded."""
        found: dict[str, Path] = {}
        for d in self.controlnet_dirs:
            if d.is_dir():
                for p in sorted(d.iterdir()):
                    if _is_controlnet(p) and _inside(p, d):
                        found[p.stem if p.is_file() else p.name] = p
        return found

    def resolve_controlnet(self, name: str) -> Path:
        """A ControlNet by name in the ControlNet folders; A1111 clients send the names the extension
        lists, ``name [hash]``, so a trailing hash is ignored. With ``allow_paths`` (the CLI) a path too.

        Raises :class:`UnknownName` with one message for "missing" and "outside the folders" alike."""
        bare = name.split(" [", 1)[0]
        return self._resolve("ControlNet", name, bare, self.list_controlnets(), self.controlnet_dirs)

    def list_loras(self) -> dict[str, Path]:
        """Name (file stem) -> path of the ``.safetensors`` files directly in the LoRA folders."""
        return {
            p.stem: p
            for d in self.lora_dirs
            if d.is_dir()
            for p in sorted(d.glob("*.safetensors"))
            if _inside(p, d)
        }

    def resolve_lora(self, name: str) -> Path:
        """A LoRA by name, as A1111's prompt tags name them: a file stem in the LoRA folders, or a path
        relative to one (``style/ink``, ``.safetensors`` optional). With ``allow_paths`` (the CLI) a path
        to any file too; a server leaves it off so clients open nothing outside the folders it was given.

        Raises :class:`UnknownName` with one message for "missing" and "outside the folders" alike."""
        return self._resolve("LoRA", name, name, self.list_loras(), self.lora_dirs)

    def _resolve(self, kind: str, name: str, bare: str, listed: dict[str, Path], folders: list[Path]) -> Path:
        """``bare`` as a listed name, else as a path inside one of ``folders``; with ``allow_paths`` a
        path anywhere first. ``name`` (as sent) is what an :class:`UnknownName` shows."""
        accept = _is_lora if kind == "LoRA" else _is_controlnet
        if self.allow_paths and accept(Path(name)):
            return Path(name).resolve()
        if bare in listed:
            return listed[bare].resolve()
        found = _find_inside(folders, bare, (".safetensors", ""), accept)
        if found is None:
            _missing_path(kind, name, self.allow_paths)
            raise UnknownName(kind, name)
        return found

    def plan_loras(self, prompts: list[str], loras: list[tuple[str, float]]) -> LoraPlan:
        """The LoRAs of a request: ``<lora:...>`` tags of any prompt, then ``loras`` (paths or names)."""
        clean, tags = [], []
        for p in prompts:
            text, found = split_lora_tags(p)
            clean.append(text)
            tags.extend(t for t in found if t not in tags)
        named = [(t, self.resolve_lora(t.name)) for t in tags]
        extra = []  # given outside the prompt: the infotext names them as the tags A1111 would need
        for name_or_path, weight in loras:
            path = self.resolve_lora(name_or_path)
            entry = (LoraTag(path.stem, float(weight), float(weight)), path)
            if entry not in named and entry not in extra:
                extra.append(entry)
        every = named + extra
        hashes = dict.fromkeys(f"{t.name}: {lora_shorthash(adapter_weights_file(p))}" for t, p in every)
        return LoraPlan(
            prompts=clean,
            infotext_prompts=[" ".join([p, *(t.text() for t, _ in extra)]) for p in prompts],
            specs=tuple(sorted({AdapterSpec(p, t.unet, t.te) for t, p in every})),
            hashes=", ".join(hashes),
        )

    def generate(
        self,
        req: GenerateRequest,
        model: str | None = None,
        loras: list[tuple[str, float]] | None = None,
        on_step: StepCallback | None = None,
        preview: Preview | None = None,
    ) -> GenerationResult:
        """Run ``req`` on ``model`` with ``loras`` (paths or names) plus any ``<lora:...>`` prompt tags.

        Tags in any prompt apply to every image of the request: one batch runs on one set of weights.
        ``preview`` receives decoded estimates while sampling (a server's live preview)."""
        name, path = self.model_path(model)
        plan = self.plan_loras(req.prompts, loras or [])
        family = self.cache.get(path, plan.specs)
        controlnets = {
            u.model: self.controlnets.get(family, self.resolve_controlnet(u.model)) for u in req.controls
        }
        req = replace(
            req,
            prompts=plan.prompts,
            sampler=req.sampler or default_sampler(family.objective.prediction_type),
            model_name=req.model_name or name,
        )
        device = self.cache.device
        offload = offload_of(family)
        with self._offload_lock if offload is not None else contextlib.nullcontext(), torch.inference_mode():
            try:
                pixels = generate_pixels(family, req, device, on_step, controlnets, self.memory, preview)
            finally:
                if offload is not None:
                    offload.release()
        images = to_pil(pixels)
        expanded = req.expanded_prompts()
        seeds = req.image_seeds()
        infotext_prompts = replace(req, prompts=plan.infotext_prompts).expanded_prompts()
        parameters = [
            a1111_parameters(req, p, s, img.width, img.height, plan.hashes)
            for p, s, img in zip(infotext_prompts, seeds, images, strict=True)
        ]
        return GenerationResult(images, expanded, seeds, parameters, req)
