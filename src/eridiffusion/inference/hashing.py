"""Model hashes as A1111 reports them: ``sha256`` of the checkpoint file and its first 10 hex digits, the
"shorthash" clients show in titles (``name [0123456789]``) and infotexts. LoRAs are hashed the way
sd-scripts and A1111 do it for ``.safetensors`` (the "addnet" hash): sha256 of the tensor data after the
JSON header, so editing the header's metadata keeps the hash; infotexts show its first 12 digits.

Hashing a multi-GB checkpoint takes seconds to minutes, so hashes are computed on first request and cached
by (path, size, modification time): an unchanged file is never read twice, a replaced one is re-hashed.
A diffusers folder has no single file; its hash covers every weight file in it, in sorted relative-path
order, each preceded by its path, so it is deterministic and changes when any component's weights do.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".gguf")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelHash:
    sha256: str

    @property
    def shorthash(self) -> str:
        return self.sha256[:10]


def weight_files(path: Path) -> list[Path]:
    """The files a model's hash covers: the file itself, or a folder's weight files in sorted order."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise ValueError(f"'{path}' holds no weight file to hash")
    return files


def _signature(path: Path) -> tuple[tuple[str, int, int], ...]:
    return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in weight_files(path))


def hash_model(path: Path) -> ModelHash:
    """sha256 of a single file (A1111's ``sha256``), or of a diffusers folder's weight files."""
    if path.is_file():
        with path.open("rb") as f:
            return ModelHash(hashlib.file_digest(f, "sha256").hexdigest())
    digest = hashlib.sha256()
    for file in weight_files(path):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    return ModelHash(digest.hexdigest())


def lora_hash(path: Path) -> str:
    """A1111's LoRA hash: sha256 of a ``.safetensors`` file after its 8-byte length and JSON header."""
    with path.open("rb") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header)
        digest = hashlib.sha256()
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@functools.lru_cache(maxsize=256)
def _lora_shorthash(path: str, size: int, mtime_ns: int) -> str:
    return lora_hash(Path(path))[:12]


def lora_shorthash(path: Path) -> str:
    """The 12 digits A1111 writes as ``Lora hashes: "name: <shorthash>"``; an unchanged file (same size
    and modification time) is hashed once per process."""
    stat = path.stat()
    return _lora_shorthash(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


class HashCache:
    """Model hashes by path, recomputed only when a file's size or modification time changes."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple[tuple[str, int, int], ...], ModelHash]] = {}
        self._lock = threading.Lock()
        self.computed = 0
        """How many hashes were computed (not served from the cache), for tests and logs."""

    def get(self, path: Path) -> ModelHash:
        key = str(path.resolve())
        signature = _signature(path)
        with self._lock:
            cached = self._entries.get(key)
            if cached is not None and cached[0] == signature:
                return cached[1]
        result = hash_model(path)
        with self._lock:
            self._entries[key] = (signature, result)
            self.computed += 1
        return result
