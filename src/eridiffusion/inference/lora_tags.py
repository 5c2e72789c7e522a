"""A1111's ``<lora:...>`` prompt tags, parsed as A1111 parses them, and written back into infotexts.

A1111 splits a tag's text at ``:``; the first item is the LoRA's name, the rest are positional numbers
or ``key=value`` pairs. Positional: ``<lora:NAME:W>`` applies W to text encoders and UNet alike,
``<lora:NAME:TE:UNET>`` sets them apart; named ``te=`` / ``unet=`` override either. ``dyn=`` (rank
truncation) and extension arguments such as ``lbw=`` (block weights) change the update in ways we do not
reproduce, so they are refused rather than silently ignored; so is anything else we cannot read.
Reference: AUTOMATIC1111's ``extensions-builtin/Lora/extra_networks_lora.py`` (read, not copied).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TAG = re.compile(r"<lora:([^>]*)>")
_FORMS = "<lora:NAME>, <lora:NAME:W>, <lora:NAME:TE:UNET> or <lora:NAME:te=W:unet=W>"
_UNSUPPORTED = {
    "lbw": "block weights (the LoRA Block Weight extension) are not supported",
    "dyn": "dyn= (dynamic rank) is not supported",
}


@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:...>`` tag: the LoRA's name and its UNet (denoiser) and text-encoder multipliers."""

    name: str
    unet: float = 1.0
    te: float = 1.0

    def text(self) -> str:
        """The tag in A1111's shortest form that means the same."""
        if self.te == self.unet:
            return f"<lora:{self.name}:{self.unet:g}>"
        return f"<lora:{self.name}:{self.te:g}:{self.unet:g}>"


def _number(tag: str, item: str) -> float:
    try:
        return float(item)
    except ValueError:
        raise ValueError(f"prompt tag '{tag}': {item!r} is not a number; use {_FORMS}") from None


def parse_lora_tag(tag: str) -> LoraTag:
    """One tag, ``<lora:...>`` included; a ValueError naming the tag when it cannot be read."""
    body = tag.removeprefix("<lora:").removesuffix(">")
    name, *items = (item.strip() for item in body.split(":"))
    if not name:
        raise ValueError(f"prompt tag '{tag}' names no LoRA; use {_FORMS}")
    positional: list[float] = []
    named: dict[str, float] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not eq:
            positional.append(_number(tag, item))
        elif key in _UNSUPPORTED:
            raise ValueError(f"prompt tag '{tag}': {_UNSUPPORTED[key]}; use {_FORMS}")
        elif key in ("te", "unet"):
            named[key] = _number(tag, value.strip())
        else:
            raise ValueError(f"prompt tag '{tag}': unknown argument {key!r}; use {_FORMS}")
    if len(positional) > 2:
        raise ValueError(f"prompt tag '{tag}' has {len(positional)} numbers; use {_FORMS}")
    te = named.get("te", positional[0] if positional else 1.0)
    unet = named.get("unet", positional[1] if len(positional) > 1 else te)
    return LoraTag(name, unet=unet, te=te)


def split_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """The prompt without its ``<lora:...>`` tags (whitespace collapsed) and the tags, in order."""
    tags = [parse_lora_tag(m.group(0)) for m in _TAG.finditer(prompt)]
    return " ".join(_TAG.sub(" ", prompt).split()), tags
