"""Atomic, rotating, resumable training checkpoints.

Layout: ``checkpoints/step_000250/`` holding ``trainable.safetensors`` (fp32 weights being trained),
``ema.safetensors`` (if EMA is on), ``optimizer.pt`` and ``state.json``. A checkpoint is written into a
hidden temporary folder, flushed to disk and only then renamed into place, so a crash mid-write never leaves
a half checkpoint where the resume logic would find it, and never touches the previous one.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

PREFIX = "step_"
TMP_PREFIX = ".tmp-"
_DAMAGE = (OSError, ValueError, RuntimeError, TypeError, EOFError, pickle.UnpicklingError, SafetensorError)
"""What a truncated or corrupt checkpoint file raises (safetensors and pickle errors are not OSErrors)."""


class StatefulOptimizer(Protocol):
    """An optimizer, or several behind one state dict (pipeline stages with per-component optimizers)."""

    def state_dict(self) -> dict[str, Any]: ...


@dataclass
class TrainState:
    """Counters that, with the weights and optimizer, determine the rest of a run."""

    step: int = 0
    micro_batches: int = 0
    epoch: int = 0
    ema_updates: int = 0
    config_hash: str = ""
    last_loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    # multi-stage pipelines: where in the pipeline, the watched metric, finished steps' summaries
    stage: int = 0
    stage_name: str = ""
    stage_step: int = 0
    stage_micro_batches: int = 0
    watch: dict[str, float] = field(default_factory=dict)
    stages_done: dict[str, dict[str, float]] = field(default_factory=dict)
    pipeline: dict[str, Any] = field(default_factory=dict)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for item in path.iterdir():
        if item.is_dir():
            _fsync_tree(item)
        else:
            with open(item, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def atomic_write_dir(final: Path, write: Any) -> Path:
    """Call ``write(tmp_dir)``, then move ``tmp_dir`` to ``final`` (replacing it) in one rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
        if final.exists():
            old = final.parent / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


class CheckpointManager:
    """Saves, lists, rotates and loads checkpoints in one folder."""

    def __init__(self, folder: Path, keep: int) -> None:
        self.folder = folder
        self.keep = keep

    def clean_partial(self) -> None:
        """Remove temporary folders a killed run left behind (they are never complete)."""
        if self.folder.is_dir():
            for p in self.folder.glob(f"{TMP_PREFIX}*"):
                shutil.rmtree(p, ignore_errors=True)

    def list(self) -> list[Path]:
        if not self.folder.is_dir():
            return []

        def is_step(p: Path) -> bool:  # step_<digits> only: a step_000500_backup copy must not crash the sort
            return p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()

        found = [p for p in self.folder.iterdir() if is_step(p)]
        return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))

    def latest(self) -> Path | None:
        found = self.list()
        return found[-1] if found else None

    def save(
        self,
        state: TrainState,
        trainable: dict[str, torch.Tensor],
        optimizer: StatefulOptimizer,
        ema: dict[str, torch.Tensor] | None,
        extra: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write one checkpoint; ``extra(folder)`` adds files (e.g. a usable LoRA) inside the same rename."""

        def write(tmp: Path) -> None:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in trainable.items()},
                tmp / "trainable.safetensors",
            )
            if ema is not None:
                save_file({k: v.contiguous().cpu() for k, v in ema.items()}, tmp / "ema.safetensors")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")
            if extra is not None:
                extra(tmp)

        path = atomic_write_dir(self.folder / f"{PREFIX}{state.step:06d}", write)
        for old in self.list()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    @staticmethod
    def load(
        path: Path,
    ) -> tuple[TrainState, dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor] | None]:
        """(state, trainable weights, optimizer state, EMA weights or None); damage raises naming the path."""
        try:
            state = TrainState(**json.loads((path / "state.json").read_text(encoding="utf-8")))
            trainable = load_file(path / "trainable.safetensors")
            optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
            ema_file = path / "ema.safetensors"
            ema = load_file(ema_file) if ema_file.exists() else None
        except _DAMAGE as exc:
            raise RuntimeError(
                f"checkpoint '{path}' is unreadable ({exc}); delete it to resume from an older one"
            ) from exc
        return state, trainable, optimizer, ema
