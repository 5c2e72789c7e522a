"""A folder as a zip stream (a model folder downloads as one file without a temporary copy on disk)."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

CHUNK = 1 << 20


class _Sink:
    """A write-only, unseekable file: :mod:`zipfile` then writes data descriptors, so nothing is rewound."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.written = 0

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        self.written += len(data)
        return len(data)

    def tell(self) -> int:
        return self.written

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out, self.parts = b"".join(self.parts), []
        return out


def zip_folder(folder: Path) -> Iterator[bytes]:
    """The files under ``folder`` (stored, not compressed: weights do not shrink), named relative to it.
    Symlinks are skipped, so nothing outside the folder is packed."""
    sink = _Sink()
    base = folder.resolve()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:  # type: ignore[arg-type]
        for path in sorted(folder.rglob("*")):
            if path.is_symlink() or not path.is_file() or not path.resolve().is_relative_to(base):
                continue
            info = zipfile.ZipInfo.from_file(path, path.relative_to(folder).as_posix())
            with path.open("rb") as src, zf.open(info, "w", force_zip64=True) as dst:
                while chunk := src.read(CHUNK):
                    dst.write(chunk)
                    yield sink.take()
            yield sink.take()
    yield sink.take()
