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
