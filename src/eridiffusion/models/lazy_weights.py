"""Weights that are read from a ``.safetensors`` file only when they are used.

A :class:`LazyTensor` knows its shape and dtype (from the file header) and how to produce its values, but
holds none. Operations on it (the key conversions' ``torch.cat``, ``chunk``, ``split``, slicing, ``.T``)
run on a meta stand-in and return new lazy tensors that remember the operation, so the loaders' own
single-file conversions run unchanged over a whole checkpoint without reading it; each converted weight is
then read and computed on its own when it is assigned into the model. That is what lets a quantised base
load with about one layer held in full precision at a time (:mod:`.streamed_loading`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map_only

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class LazyTensor(torch.Tensor):
    """A tensor whose values are computed by ``make`` when :meth:`materialize` is called."""

    _meta: torch.Tensor
    _make: Callable[[], torch.Tensor]

    @staticmethod
    def __new__(cls: type[LazyTensor], meta: torch.Tensor, make: Callable[[], torch.Tensor]) -> LazyTensor:
        r = torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, meta.shape, strides=meta.stride(), dtype=meta.dtype, device=meta.device, requires_grad=False
        )
        r._meta = meta
        r._make = make
        return r

    def materialize(self) -> torch.Tensor:
        return self._make()

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return f"LazyTensor(shape={tuple(self.shape)}, dtype={self.dtype})"

    @classmethod
    def __torch_dispatch__(
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        meta_args, meta_kwargs = tree_map_only(LazyTensor, lambda t: t._meta, (args, kwargs))
        out = func(*meta_args, **meta_kwargs)

        def compute() -> Any:
            real_args, real_kwargs = tree_map_only(LazyTensor, materialize, (args, kwargs))
            return func(*real_args, **real_kwargs)

        leaves, _ = tree_flatten(out)
        index = {id(leaf): i for i, leaf in enumerate(leaves)}
        return tree_map_only(
            torch.Tensor,
            lambda leaf: LazyTensor(leaf, functools.partial(_pick, compute, index[id(leaf)])),
            out,
        )


def _pick(compute: Callable[[], Any], i: int) -> torch.Tensor:
    leaves, _ = tree_flatten(compute())
    return leaves[i]


def materialize(t: torch.Tensor) -> torch.Tensor:
    """The values of ``t`` (a plain tensor is returned as it is)."""
    return t.materialize() if isinstance(t, LazyTensor) else t


class SafetensorsReader:
    """``.safetensors`` files read one tensor at a time into memory of its own.

    The header (8-byte length, then JSON: dtype, shape and byte range of each tensor) is parsed here and
    each tensor is read with plain file reads: ``safe_open`` maps the whole file, and every page a
    conversion or a quantiser touches then stays in the process's resident memory for as long as any tensor
    of the file lives, which is the full file size by the end. The last tensor read is kept, so the parts of
    a fused tensor (q/k/v) converted one by one read it once.
    """

    def __init__(self, files: list[Path]) -> None:
        self._where: dict[str, tuple[Path, int, dict[str, Any]]] = {}
        self._last: tuple[str, torch.Tensor] | None = None
        for path in files:
            header, start = _read_header(path)
            for key, entry in header.items():
                self._where[key] = (path, start, entry)

    def forget(self) -> None:
        """Drop the kept tensor."""
        self._last = None

    def read(self, key: str) -> torch.Tensor:
        if self._last is None or self._last[0] != key:
            self._last = (key, self._read(key))
        return self._last[1]

    def _read(self, key: str) -> torch.Tensor:
        path, start, entry = self._where[key]
        begin, end = entry["data_offsets"]
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        with path.open("rb") as f:
            f.seek(start + begin)
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise ValueError(f"'{path}' is truncated: {key} ends past the end of the file")
                done += n
        return buffer.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def lazy_state(self) -> dict[str, torch.Tensor]:
        """Every tensor of the files as a :class:`LazyTensor`."""
        state: dict[str, torch.Tensor] = {}
        for key, (_, _, entry) in self._where.items():
            meta = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]], device="meta")
            state[key] = LazyTensor(meta, functools.partial(self.read, key))
        return state


def _read_header(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """(tensor entries, offset of the data) of a ``.safetensors`` file; a clear error when it is not one."""
    try:
        with path.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 2 <= length <= min(path.stat().st_size - 8, 100 * 2**20):
                raise ValueError(f"header length {length} does not fit the file")
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        for key, entry in header.items():
            if entry["dtype"] not in _DTYPES:
                raise ValueError(f"{key} has dtype {entry['dtype']}, which is not supported here")
            begin, end = entry["data_offsets"]
            if not 0 <= begin <= end:
                raise ValueError(f"{key} has a bad byte range")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"'{path}' is not a readable .safetensors file: {exc}") from None
    return header, 8 + length
