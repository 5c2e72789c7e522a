"""The building blocks of config translation: value spellings, the :class:`Translation` being built and
the small handlers (rename, accept-only-if, not-applied) that the key tables of :mod:`aitoolkit` are made of.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from eridiffusion.config.schema import (
    LoggingConfig,
    ModelConfig,
    NetworkConfig,
    SampleConfig,
    SaveConfig,
    TrainConfig,
)

DTYPES = {
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "bf16": "bf16", "bfloat16": "bf16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "full": "fp32",
}  # fmt: skip
MIXED_PRECISION = {"fp16": "fp16", "bf16": "bf16", "fp32": "no"}
OPTIMIZER_NAMES = {
    "adamw": "adamw", "adam": "adamw", "adamw8bit": "adamw8bit", "adam8bit": "adamw8bit", "sgd": "sgd",
    "prodigy": "prodigy", "adafactor": "adafactor", "lion": "lion", "lion8bit": "lion8bit",
    "adamwschedulefree": "adamw_schedulefree", "adamw_schedulefree": "adamw_schedulefree",
    "schedulefreeadamw": "adamw_schedulefree", "came": "came",
}  # fmt: skip
QUANTIZE = {"qfloat8": "fp8", "float8": "fp8", "fp8": "fp8", "qint8": "int8", "int8": "int8",
            "qint4": "int4", "int4": "int4", "nf4": "nf4", "none": "none"}  # fmt: skip
ARCH_FLAGS = {"is_xl": "sdxl", "is_sdxl": "sdxl", "is_flux": "flux", "is_v3": "sd3", "is_sd3": "sd3"}
UNSUPPORTED_ARCH_FLAGS = {
    "is_v2": "SD 2.x",
    "is_ssd": "SSD-1B",
    "is_vega": "Vega",
    "is_pixart": "PixArt",
    "is_pixart_sigma": "PixArt-Sigma",
    "is_auraflow": "AuraFlow",
    "is_lumina2": "Lumina 2",
}
TIMESTEP_TYPES = {"sigmoid": "logit_normal", "lognorm": "logit_normal", "linear": "uniform"}
SAMPLERS = {"flowmatch": "flow_euler", "flow_match": "flow_euler"}

SECTIONS: dict[str, type[BaseModel]] = {
    "model": ModelConfig,
    "network": NetworkConfig,
    "train": TrainConfig,
    "save": SaveConfig,
    "sample": SampleConfig,
    "logging": LoggingConfig,
}


class TranslationError(ValueError):
    """Keys that have no equivalent; the message lists each with what to do."""


@dataclass
class Translation:
    """The eri config being built, what was done with each source key, and what could not be done."""

    out: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    disable_sampling: bool = False
    text_encoder_only: str | None = None
    """The source key (``train_unet: false``) asking for an adapter on the text encoders alone; resolved
    once the whole file is read, since the network section may come after it."""
    sources: dict[str, str] = field(default_factory=dict)
    """eri path -> the source key that set it, to catch an alias and its canonical key both given."""

    def put(self, src: str, dst: str, value: Any, note: bool = True) -> None:
        if dst in self.sources and self.sources[dst] != src:
            self.refuse(src, f"sets {dst}, as {self.sources[dst]} does; keep one of them")
            return
        node = self.out
        parts = dst.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        existing = node.get(parts[-1])
        if isinstance(existing, dict) and isinstance(value, dict):  # e.g. model.options after a translated
            clash = sorted(k for k in existing if k in value and existing[k] != value[k])  # options key
            if clash:
                self.refuse(src, f"sets {dst}.{clash[0]}, as another key of this file does; keep one of them")
                return
            value = {**value, **existing}
        elif existing is not None and existing != value:  # set inside a section another key wrote whole
            self.refuse(src, f"sets {dst}, as another key of this file does; keep one of them")
            return
        self.sources[dst] = src
        node[parts[-1]] = value
        if note:
            shown = f"[{len(value)} items]" if isinstance(value, list) and len(value) > 3 else repr(value)
            self.notes.append(f"{src} -> {dst}" + ("" if isinstance(value, dict) else f" = {shown}"))

    def ignore(self, src: str, why: str) -> None:
        self.notes.append(f"{src}: not applied ({why})")

    def refuse(self, src: str, why: str) -> None:
        self.problems.append(f"{src}: {why}")


Handler = Callable[[Translation, str, str, Any], None]
"""(translation, source path of the key, eri section path, value)."""


def move(dst: str, convert: Callable[[Any], Any] | None = None) -> Handler:
    """Rename a key (``dst`` relative to the section, or absolute when it starts with ``/``)."""

    def handle(t: Translation, src: str, section: str, value: Any) -> None:
        target = dst[1:] if dst.startswith("/") else f"{section}.{dst}"
        try:
            converted = convert(value) if convert else value
        except ValueError as exc:
            t.refuse(src, str(exc))
            return
        renamed = src.rsplit(".", 1)[-1] != target.rsplit(".", 1)[-1]
        t.put(src, target, converted, note=renamed or converted != value)

    return handle


def only(expected: Any, why: str, meaning: str = "what eri does anyway") -> Handler:
    """Accept the key only with the value that matches what eri does anyway; otherwise refuse with ``why``."""
    allowed = expected if isinstance(expected, tuple) else (expected,)

    def handle(t: Translation, src: str, section: str, value: Any) -> None:
        if value in allowed:
            t.notes.append(f"{src}: {value!r} is {meaning}")
        else:
            t.refuse(src, why)

    return handle


def cosmetic(why: str) -> Handler:
    """A key that cannot change the trained weights (UI bookkeeping, sample looks): listed, not applied."""

    def handle(t: Translation, src: str, section: str, value: Any) -> None:
        t.ignore(src, why)

    return handle


def lookup(table: dict[str, str], what: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        key = str(value).lower().replace("-", "")
        if key not in table:
            raise ValueError(f"{what} {value!r} is not known; use one of {sorted(set(table))}")
        return table[key]

    return convert
