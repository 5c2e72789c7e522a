"""Model families behind one interface (see :mod:`eridiffusion.models.protocol`).

Each family registers a :class:`FamilyEntry` in ``FAMILIES``: how to build it from scratch, how to load it
from a local folder or single file, and how to recognise its files. The trainer and sampler only call
:func:`build_family` and :func:`load_family`.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eridiffusion.config.schema import ModelConfig
from eridiffusion.models.flux import FluxFamily
from eridiffusion.models.hub import resolve_model_path
from eridiffusion.models.protocol import Conditioning, ModelFamily, NoiseObjective
from eridiffusion.models.sd3 import SD3Family
from eridiffusion.models.sd15 import SD15Family
from eridiffusion.models.sdxl import SDXLFamily
from eridiffusion.models.stable_diffusion import STORAGE_DTYPES
from eridiffusion.models.streamed_loading import quantising_loads
from eridiffusion.models.tiny import FAMILY_FILE, TinyFamily, parse_options

__all__ = [
    "FAMILIES",
    "Conditioning",
    "FamilyEntry",
    "ModelFamily",
    "NoiseObjective",
    "build_family",
    "detect_arch",
    "load_family",
]


@dataclass(frozen=True)
class FamilyEntry:
    arch: str
    build: Callable[[dict[str, Any], int, Sequence[str] | None], ModelFamily]
    """(model.options, seed, training captions) -> randomly initialised model. Only the tiny family learns
    its tokenizer from the captions; the others build the fixed local vocabulary (their real tokenizers come
    with the weights they load)."""
    load: Callable[[Path, ModelConfig], ModelFamily]
    """(path, model config with component paths) -> loaded model, offline."""
    detect: Callable[[Path], bool]
    """Does this folder or single file hold this family?"""
    load_options: bool = False
    """Does ``load`` honour ``model.options`` (e.g. the flow-matching training settings of sd3/flux)?"""
    flow_matching: bool = False
    """Is its objective rectified flow (so eps/v-only settings such as min-SNR do not apply)? Lets
    ``eri validate`` judge such settings before loading any weight."""


def _tiny_build(options: dict[str, Any], seed: int, captions: Sequence[str] | None) -> ModelFamily:
    with tempfile.TemporaryDirectory() as tmp:
        return TinyFamily.build(parse_options(options), Path(tmp) / "tokenizer", seed=seed, captions=captions)


def _fixed_vocabulary(
    build: Callable[[dict[str, Any], int], ModelFamily],
) -> Callable[[dict[str, Any], int, Sequence[str] | None], ModelFamily]:
    return lambda options, seed, _captions: build(options, seed)


def _tiny_detect(path: Path) -> bool:
    meta = path / FAMILY_FILE
    return meta.is_file() and json.loads(meta.read_text(encoding="utf-8")).get("arch") == "tiny"


FAMILIES: dict[str, FamilyEntry] = {
    "tiny": FamilyEntry(
        "tiny", _tiny_build, lambda path, _cfg: TinyFamily.from_pretrained(path), _tiny_detect
    ),
    "sd15": FamilyEntry("sd15", _fixed_vocabulary(SD15Family.build), SD15Family.load, SD15Family.detect),
    "sdxl": FamilyEntry("sdxl", _fixed_vocabulary(SDXLFamily.build), SDXLFamily.load, SDXLFamily.detect),
    "sd3": FamilyEntry(
        "sd3",
        _fixed_vocabulary(SD3Family.build),
        SD3Family.load,
        SD3Family.detect,
        load_options=True,
        flow_matching=True,
    ),
    "flux": FamilyEntry(
        "flux",
        _fixed_vocabulary(FluxFamily.build),
        FluxFamily.load,
        FluxFamily.detect,
        load_options=True,
        flow_matching=True,
    ),
}


def build_family(
    arch: str, options: dict[str, Any], seed: int = 0, captions: Sequence[str] | None = None
) -> ModelFamily:
    """A randomly initialised model of ``arch``; ``seed`` fixes the initial weights and ``captions`` (the
    job's training captions, trigger words applied) the vocabulary of a tokenizer built with the model."""
    if arch not in FAMILIES:
        raise ValueError(f"model.arch {arch!r} is not a known family; choose one of {sorted(FAMILIES)}")
    return FAMILIES[arch].build(options, seed, captions)


def detect_arch(path: Path) -> str:
    """The family of a local folder or single file, from its own files; a clear error when unknown."""
    found = [arch for arch, entry in FAMILIES.items() if entry.detect(path)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(
            f"cannot tell which model family '{path}' is; set model.arch to one of {sorted(FAMILIES)} "
            "(or point model.name_or_path at a diffusers folder, a single .safetensors checkpoint, or a "
            "folder written by `eri train`)"
        )
    raise ValueError(f"'{path}' matches several families {found}; set model.arch to pick one")


def load_family(path: str | Path, cfg: ModelConfig | None = None, where: str | None = None) -> ModelFamily:
    """Load a local model folder or single file offline (a Hub id from the local cache); the family comes
    from ``cfg.arch`` or the files. ``where`` names the setting in errors (default: model.name_or_path when
    a config is given)."""
    path = resolve_model_path(path, where or ("model.name_or_path" if cfg is not None else "model path"))
    cfg = cfg or ModelConfig(name_or_path=str(path))
    arch = cfg.arch or detect_arch(path)
    if arch not in FAMILIES:
        raise ValueError(f"model.arch {arch!r} is not a known family; choose one of {sorted(FAMILIES)}")
    if cfg.options and not FAMILIES[arch].load_options:
        raise ValueError("model.options only applies when building from scratch; remove it or name_or_path")
    with quantising_loads(cfg.quantize, cfg.quantize_text_encoders, STORAGE_DTYPES[cfg.dtype]):
        return FAMILIES[arch].load(path, cfg)
