"""Atomic, rotating, resumable training checkpoints.

Layout: ``checkpoints/step_000250/`` holding ``trainable.safetensors`` (fp32 weights being trained),
``ema.safetensors`` (if EMA is on), ``optimizer.pt`` and ``state.json``. A checkpoint is written into a
hidden temporary folder, flushed to disk and only then renamed into place, so a crash mid-write never leaves
a half checkpoint where the resume logic would find it, and never touches the previous one.

``save.keep_best`` checkpoints (lowest ``val/loss``) are written the same way under ``checkpoints/best/``,
out of reach of the rotation; the list of them travels in every checkpoint's ``state.json`` (``best``), so a
resumed run keeps it, and ``best/best.json`` lists them for people.
"""

from __future__ import annotations

import errno
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
BEST = "best"
"""Sub-folder of the keep-best checkpoints (``save.keep_best``)."""
_DAMAGE = (OSError, ValueError, RuntimeError, TypeError, EOFError, pickle.UnpicklingError, SafetensorError)
"""What a truncated or corrupt checkpoint file raises (safetensors and pickle errors are not OSErrors)."""


class DiskFullError(RuntimeError):
    """A write ran out of space; what was there before is untouched."""


class CheckpointError(RuntimeError):
    """No checkpoint of the run can be read."""


_WRITE_FAILURES = ("no space left", "file write failed", "basic_ios::clear", "iostream error", "disk quota")


def _is_disk_full(exc: BaseException) -> bool:
    """ENOSPC as Python raises it, or as torch.save's C++ writer words it (it loses the errno)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, RuntimeError) and any(w in str(exc).lower() for w in _WRITE_FAILURES)


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor inside nested dicts/lists (weights, optimizer states)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def guarded_write(final: Path, write: Callable[[Path], None], needed: int) -> Path:
    """:func:`atomic_write_dir` that checks the free space first and turns a full disk into one clear
    :class:`DiskFullError` (the previous copy of ``final`` stays as it was)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(final.parent).free
    mb = max(1, round(needed / 2**20))
    if needed > free:
        raise DiskFullError(
            f"no space left on device at {final.parent}: {mb} MB needed, {free / 2**20:.0f} MB free; "
            "free some space (or set output_dir elsewhere) and run the same command again to resume"
        )
    try:
        return atomic_write_dir(final, write)
    except (OSError, RuntimeError) as exc:
        if not _is_disk_full(exc):
            raise
        raise DiskFullError(
            f"no space left on device at {final.parent}, {mb} MB needed; the previous checkpoint is kept. "
            "Free some space and run the same command again to resume"
        ) from exc


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
    run_id: str = ""
    """Which run wrote the checkpoint: rotation only ever deletes checkpoints of the run that is saving."""
    world_size: int = 1
    """Processes that trained it (the data order of a resume with another count differs; see README)."""
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
    best: list[dict[str, Any]] = field(default_factory=list)
    """The keep-best checkpoints: ``{"step", "stage", "val_loss"}`` each (see ``save.keep_best``)."""


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


def recover_partial_writes(folder: Path) -> list[Path]:
    """Tidy what a kill in the middle of :func:`atomic_write_dir` left in ``folder``: a half-written
    ``.tmp-NAME-PID`` is removed; a ``.tmp-old-NAME-PID`` is the previous complete copy and is put back as
    NAME when the kill came before the new one was renamed into place (else it is a redundant old copy)."""
    if not folder.is_dir():
        return []
    touched = []
    for p in sorted(folder.glob(f"{TMP_PREFIX}old-*")):
        name = p.name[len(f"{TMP_PREFIX}old-") :].rsplit("-", 1)[0]
        if (folder / name).exists():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.rename(folder / name)
        touched.append(p)
    for p in folder.glob(f"{TMP_PREFIX}*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            touched.append(p)
    return touched


def read_run_id(path: Path) -> str | None:
    """The run id in a checkpoint's state.json; None when it cannot be read."""
    try:
        return str(json.loads((path / "state.json").read_text(encoding="utf-8")).get("run_id", ""))
    except (OSError, ValueError):
        return None


def _by_loss(entry: dict[str, Any]) -> tuple[int, float, int]:
    return int(entry["stage"]), float(entry["val_loss"]), int(entry["step"])


class CheckpointManager:
    """Saves, lists, rotates and loads checkpoints in one folder."""

    def __init__(self, folder: Path, keep: int, run_id: str = "") -> None:
        self.folder = folder
        self.keep = keep
        self.run_id = run_id

    def clean_partial(self) -> None:
        """Remove temporary folders a killed run left behind (they are never complete)."""
        recover_partial_writes(self.folder)
        recover_partial_writes(self.folder / BEST)

    def list(self, folder: Path | None = None) -> list[Path]:
        """The step checkpoints in order (of ``folder``, default the rotating ones)."""
        folder = self.folder if folder is None else folder
        if not folder.is_dir():
            return []

        def is_step(p: Path) -> bool:  # step_<digits> only: a step_000500_backup copy must not crash the sort
            return p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()

        found = [p for p in folder.iterdir() if is_step(p)]
        return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))

    def best(self) -> list[Path]:
        """The keep-best checkpoints on disk, in step order."""
        return self.list(self.folder / BEST)

    def latest(self) -> Path | None:
        found = self.list()
        return found[-1] if found else None

    def save(
        self,
        state: TrainState,
        trainable: dict[str, torch.Tensor],
        optimizer: StatefulOptimizer | dict[str, Any],
        ema: dict[str, torch.Tensor] | None,
        extra: Callable[[Path], None] | None = None,
        best: bool = False,
    ) -> Path:
        """Write one checkpoint; ``extra(folder)`` adds files (e.g. a usable LoRA) inside the same rename.
        ``optimizer`` is an optimizer (or set) or its state dict already gathered. ``best``: a keep-best
        checkpoint (``state.best`` already lists it), written under ``best/``; the ones it displaced are
        removed only after it is in place."""
        opt_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()

        def write(tmp: Path) -> None:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in trainable.items()},
                tmp / "trainable.safetensors",
            )
            if ema is not None:
                save_file({k: v.contiguous().cpu() for k, v in ema.items()}, tmp / "ema.safetensors")
            torch.save(opt_state, tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")
            if extra is not None:
                extra(tmp)

        needed = 2 * tensor_bytes(trainable) + tensor_bytes(ema) + tensor_bytes(opt_state)
        folder = self.folder / BEST if best else self.folder
        path = guarded_write(folder / f"{PREFIX}{state.step:06d}", write, needed + 2**16)
        if best:
            self._prune_best(state)
            return path
        own = [p for p in self.list() if read_run_id(p) == self.run_id]
        for old in own[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def _prune_best(self, state: TrainState) -> None:
        """Remove this run's keep-best checkpoints ``state.best`` no longer lists (displaced by a better one,
        or left by a run killed before its list was saved), then rewrite ``best.json`` atomically."""
        listed = {int(e["step"]) for e in state.best}
        for p in self.best():
            if int(p.name[len(PREFIX) :]) not in listed and read_run_id(p) == self.run_id:
                shutil.rmtree(p, ignore_errors=True)
        rows = [{**e, "path": f"{PREFIX}{int(e['step']):06d}"} for e in sorted(state.best, key=_by_loss)]
        tmp = self.folder / BEST / f".best.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(rows, indent=1), encoding="utf-8")
        os.replace(tmp, self.folder / BEST / "best.json")

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
