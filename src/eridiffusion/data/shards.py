"""Webdataset-style tar shards, streamed: for datasets larger than the disk (or the latent cache).

A shard is an uncompressed ``.tar`` whose members are grouped into samples by basename, as in webdataset:
``000123.jpg`` + ``000123.txt`` is one sample (key = path up to the first dot of the file name). Nothing is
extracted. On first use each shard is indexed once (member offsets, image sizes from the image header,
captions) and the index is kept in a small JSON file keyed by the shard's path, size and mtime, so a
re-run starts at once. Training then reads members by offset with the stdlib ``tarfile`` layout, in the
order :mod:`eridiffusion.data.loader` plans: shards shuffled per (seed, epoch), samples shuffled within a
shard, so reads stay local to a shard and any micro-batch can be re-read by position on resume.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from PIL import Image

from eridiffusion.data.folder import IMAGE_EXTENSIONS, DatasetError, load_rgb, upright_size

logger = logging.getLogger(__name__)

INDEX_VERSION = 1
_HEAD_BYTES = 1 << 16
"""Enough of an image file for Pillow to read its size and EXIF orientation without decoding pixels."""
_BRACE = re.compile(r"\{([^{}]*)\}")
_COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZ": "bzip2", b"\xfd7": "xz", b"(\xb5": "zstd"}


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..009}`` ranges (zero-padded like the first bound) and ``{a,b}`` lists, as webdataset
    and the shell do; several braces expand as a product, left to right."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    bounds = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if bounds:
        first, last = bounds.groups()
        width = len(first) if first.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        options = [str(i).zfill(width) for i in range(int(first), int(last) + step, step)]
    else:
        options = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def resolve_shards(spec: str | list[str]) -> list[Path]:
    """The shard files a ``datasets[].shards`` value names, in order; an error lists missing ones."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    paths = [Path(name) for pattern in patterns for name in expand_braces(pattern)]
    if not paths:
        raise DatasetError("no shard files given")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(f"'{p}'" for p in missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise DatasetError(f"{len(missing)} of {len(paths)} shard files do not exist: {shown}")
    return paths


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's key/extension split: 'dir/abc.def.jpg' -> ('dir/abc', 'def.jpg')."""
    folder, _, filename = name.rpartition("/")
    stem, _, ext = filename.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _header_size(tar: tarfile.TarFile, member: tarfile.TarInfo) -> tuple[int, int]:
    """Upright size from the first bytes of an image member; falls back to the whole member."""
    fh = tar.extractfile(member)
    assert fh is not None
    head = fh.read(_HEAD_BYTES)
    try:
        with Image.open(io.BytesIO(head)) as img:
            return upright_size(img)
    except Exception:
        with Image.open(io.BytesIO(head + fh.read())) as img:
            return upright_size(img)


def index_shard(path: Path, caption_ext: str) -> dict[str, Any]:
    """Samples of one shard: key, image member offset/length, upright size, caption; plus what was skipped.

    Only headers are read here; a member whose pixels turn out to be corrupt is replaced at load time
    (see :meth:`eridiffusion.data.loader.TrainingData.batch`).
    """
    with path.open("rb") as fh:
        magic = fh.read(2)
    if magic in _COMPRESSED_MAGIC:
        raise DatasetError(
            f"shard '{path}' is {_COMPRESSED_MAGIC[magic]}-compressed; shards must be plain .tar files "
            "(members are read by offset), e.g. `tar cf` without z/j/J"
        )
    caption_ext = caption_ext.lstrip(".").lower()
    samples: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    missing_captions = 0
    try:
        with tarfile.open(path, "r:") as tar:
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            for member in tar:
                if member.isfile():
                    key, ext = _split_member(member.name)
                    groups.setdefault(key, {})[ext] = member
            for key, members in groups.items():
                image = next((m for ext, m in members.items() if f".{ext}" in IMAGE_EXTENSIONS), None)
                if image is None:
                    continue
                if image.size == 0:
                    skipped.append((image.name, "empty file (0 bytes)"))
                    continue
                try:
                    width, height = _header_size(tar, image)
                except Exception as exc:
                    skipped.append((image.name, f"unreadable image ({type(exc).__name__}: {exc})"))
                    continue
                caption = ""
                if caption_ext in members:
                    raw = tar.extractfile(members[caption_ext])
                    try:
                        caption = raw.read().decode("utf-8").strip() if raw else ""
                    except UnicodeDecodeError:
                        skipped.append((image.name, f"caption '{key}.{caption_ext}' is not valid UTF-8"))
                        continue
                else:
                    missing_captions += 1
                samples.append(
                    {
                        "key": key,
                        "member": image.name,
                        "offset": image.offset_data,
                        "length": image.size,
                        "size": [width, height],
                        "caption": caption,
                    }
                )
    except tarfile.TarError as exc:
        raise DatasetError(f"shard '{path}' is not a readable tar file ({exc})") from None
    return {
        "version": INDEX_VERSION,
        "samples": samples,
        "skipped": skipped,
        "missing_captions": missing_captions,
    }


def _index_file(index_dir: Path, path: Path, caption_ext: str) -> Path:
    stat = path.stat()
    ident = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{caption_ext}|{INDEX_VERSION}"
    return index_dir / f"{hashlib.blake2b(ident.encode(), digest_size=16).hexdigest()}.json"


def load_index(path: Path, caption_ext: str, index_dir: Path | None) -> dict[str, Any]:
    """The shard's index, read from ``index_dir`` when an up-to-date one is there, else built and saved."""
    cached = _index_file(index_dir, path, caption_ext) if index_dir is not None else None
    if cached is not None and cached.is_file():
        try:
            return json.loads(cached.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            logger.warning("ignoring damaged shard index %s; rebuilding it", cached)
    index = index_shard(path, caption_ext)
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(index), encoding="utf-8")
            os.replace(tmp, cached)
        except OSError as exc:
            logger.info("could not save the index of %s (%s); it will be rebuilt next run", path, exc)
    return index


@dataclass(frozen=True)
class _Sample:
    shard: int
    rank: int
    """Position of the sample inside its shard (tar order)."""
    offset: int
    length: int
    label: str


class ShardSource:
    """Samples of a list of shards, addressable by index; images are read from the tars by offset.

    File handles are opened lazily per process, so DataLoader workers (forked or spawned) each get their own.
    """

    streamed = True

    def __init__(self, shards: list[Path], caption_ext: str = "txt", index_dir: Path | None = None) -> None:
        self.shards = list(shards)
        self.samples: list[_Sample] = []
        self.sizes: list[tuple[int, int]] = []
        self.captions: list[str] = []
        self.shard_counts: list[int] = []
        self.skipped = 0
        missing_captions = 0
        for s, shard in enumerate(self.shards):
            index = load_index(shard, caption_ext, index_dir)
            for member, problem in index["skipped"]:
                logger.warning("skipping %s in %s: %s", member, shard, problem)
            self.skipped += len(index["skipped"])
            missing_captions += index["missing_captions"]
            for rank, sample in enumerate(index["samples"]):
                label = f"{shard}:{sample['member']}"
                self.samples.append(_Sample(s, rank, sample["offset"], sample["length"], label))
                self.sizes.append((sample["size"][0], sample["size"][1]))
                self.captions.append(sample["caption"])
            self.shard_counts.append(len(index["samples"]))
        if self.skipped:
            logger.warning("skipped %d samples in %d shards", self.skipped, len(self.shards))
        if missing_captions:
            logger.warning(
                "%d samples in the shards have no .%s caption and will train with an empty caption",
                missing_captions,
                caption_ext.lstrip("."),
            )
        if not self.samples:
            raise DatasetError(
                f"the {len(self.shards)} shard(s) hold no readable image samples "
                f"({self.skipped} skipped); a sample is an image member plus a same-basename caption"
            )
        self._handles: dict[int, IO[bytes]] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}

    def label(self, index: int) -> str:
        return self.samples[index].label

    def read_bytes(self, index: int) -> bytes:
        sample = self.samples[index]
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(sample.shard)
        if handle is None:
            handle = self._handles[sample.shard] = self.shards[sample.shard].open("rb")
        handle.seek(sample.offset)
        return handle.read(sample.length)

    def open(self, index: int) -> Image.Image:
        return load_rgb(io.BytesIO(self.read_bytes(index)))

    def stream_position(self, index: int) -> tuple[int, int]:
        """(shard, rank inside the shard) of a sample, for the loader's shard-local epoch order."""
        sample = self.samples[index]
        return sample.shard, sample.rank

    def default_cache_dir(self) -> Path:
        return self.shards[0].parent / ".eri_cache"
