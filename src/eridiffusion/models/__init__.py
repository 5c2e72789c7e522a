"""Model families behind one interface (see :mod:`eridiffusion.models.protocol`)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from eridiffusion.models.protocol import Conditioning, ModelFamily, NoiseObjective
from eridiffusion.models.tiny import FAMILY_FILE, TinyFamily, parse_options

__all__ = ["Conditioning", "ModelFamily", "NoiseObjective", "build_family", "load_family"]


def build_family(arch: str, options: dict[str, Any], seed: int = 0) -> ModelFamily:
    """A randomly initialised model of ``arch``; ``seed`` fixes the initial weights."""
    if arch == "tiny":
        with tempfile.TemporaryDirectory() as tmp:
            return TinyFamily.build(parse_options(options), Path(tmp) / "tokenizer", seed=seed)
    raise ValueError(f"model.arch {arch!r} cannot be built from scratch yet; set model.name_or_path")


def load_family(path: str | Path) -> ModelFamily:
    """Load a saved model folder offline; the family is read from the folder itself."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path '{path}' does not exist")
    meta_file = path / FAMILY_FILE
    if not meta_file.is_file():
        raise ValueError(
            f"cannot tell which model family '{path}' is: no {FAMILY_FILE} in it; "
            "point model.name_or_path at a folder written by `eri train` (output/NAME/model)"
        )
    arch = json.loads(meta_file.read_text(encoding="utf-8")).get("arch")
    if arch == "tiny":
        return TinyFamily.from_pretrained(path)
    raise ValueError(f"{meta_file}: unknown model family {arch!r}")
