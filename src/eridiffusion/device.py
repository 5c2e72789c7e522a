"""Device selection shared by training, inference and serving."""

from __future__ import annotations

import torch


def resolve_device(name: str, where: str = "device") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error (naming the setting
    ``where``), never a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{where}={name!r} but no CUDA device is available; use auto or cpu")
    return device


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a RuntimeError naming the allocation)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        w in text for w in ("out of memory", "can't allocate memory", "not enough memory")
    )


def release_memory(device: torch.device | str | None = None) -> None:
    """Give what an abandoned computation held back to the allocator (after an out-of-memory error)."""
    import gc

    gc.collect()
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.empty_cache()
