"""Hugging Face Hub ids as ``model.name_or_path``, resolved from the local cache only.

eri runs offline (no download at run time, see DESIGN.md), but a user who fetched a model once with
``hf download org/name`` has it in the Hugging Face cache. An id such as ``black-forest-labs/FLUX.1-dev``
is looked up there (``HF_HUB_CACHE``, else ``HF_HOME``/hub, else ~/.cache/huggingface/hub), read at call
time so a changed environment is honoured; when it is not cached the error says how to get it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
"""``org/name``: one slash, no leading ``.``/``/``, the characters the Hub allows."""


def hub_cache_dir() -> Path:
    """The cache folder huggingface_hub itself would use, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home).expanduser() / "hub"


def looks_like_hub_id(text: str) -> bool:
    return bool(HUB_ID.match(text)) and not text.endswith((".safetensors", ".ckpt", ".bin", ".pt"))


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The local snapshot folder of ``repo_id`` (its ``main`` ref, or ``revision``), or None; no network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            repo_id, revision=revision, cache_dir=str(hub_cache_dir()), local_files_only=True
        )
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        return None
    return Path(folder)


def resolve_model_path(name_or_path: str | Path, where: str = "model.name_or_path") -> Path:
    """A local file or folder as given, else a Hub id's cached snapshot; a FileNotFoundError naming
    ``where`` and what to do otherwise."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    text = str(name_or_path)
    if looks_like_hub_id(text):
        snapshot = cached_snapshot(text)
        if snapshot is not None:
            return snapshot
        raise FileNotFoundError(
            f"{where}: '{text}' is not a local file or folder; it looks like a Hugging Face Hub id, but it "
            f"is not in the local Hugging Face cache ({hub_cache_dir()}). eri runs offline and never "
            f"downloads: fetch it once with `hf download {text}` (set HF_HOME or HF_HUB_CACHE if your cache "
            f"is elsewhere), or point {where} at a local diffusers folder or single .safetensors file"
        )
    raise FileNotFoundError(
        f"{where}: model path '{text}' does not exist; give a local diffusers folder, a single "
        ".safetensors file, or a Hugging Face Hub id (org/name) that is in the local cache"
    )
