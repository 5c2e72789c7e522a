"""The run folder: which run owns it, whether it finished, and which checkpoint a resume starts from.

Nothing a user trained is lost here: a fresh run (``save.resume: false``) in a used folder moves the old
run aside instead of mixing with it; a finished run is recognised and left alone; a damaged checkpoint is
renamed aside (never deleted) and the newest readable one is used.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eridiffusion.training.checkpoint import (
    CheckpointError,
    CheckpointManager,
    TrainState,
    recover_partial_writes,
)

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
OUTPUTS = ("checkpoints", "model", "stages", "samples", "logs", "metrics.jsonl", "pipeline_summary.json")
"""What a run writes into its folder (with its adapter file NAME.safetensors)."""

Loaded = tuple[TrainState, dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor] | None]


@dataclass
class RunInfo:
    """``run.json``: the run's id, and once it has written its final output, what and for which config."""

    run_id: str
    status: str = "running"
    """running, finished, interrupted (stopped by a signal, resumable) or failed (``error`` says why)."""
    fingerprint: str = ""
    final_step: int = 0
    output: str = ""
    pid: int = 0
    """The main training process while running (a tool can tell a live run from a killed one)."""
    step: int = 0
    """The optimizer step reached when the status last changed."""
    error: str = ""
    updated: str = ""

    def set(self, run_dir: Path, status: str, step: int, error: str = "") -> None:
        """Record a status change (main process)."""
        self.status, self.step, self.error = status, step, error
        self.pid = os.getpid() if status == "running" else 0
        self.write(run_dir)

    def write(self, run_dir: Path) -> None:
        self.updated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        tmp = run_dir / f".{RUN_FILE}.tmp"
        tmp.write_text(json.dumps(self.__dict__, indent=1), encoding="utf-8")
        tmp.replace(run_dir / RUN_FILE)

    @staticmethod
    def read(run_dir: Path) -> RunInfo | None:
        try:
            data = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
            return RunInfo(**{k: data[k] for k in RunInfo.__dataclass_fields__ if k in data})
        except (OSError, ValueError, TypeError, KeyError):
            return None


def _used(run_dir: Path, adapter_name: str) -> bool:
    return any((run_dir / n).exists() for n in (*OUTPUTS, adapter_name))


def move_aside(run_dir: Path) -> Path:
    """Rename a previous run's folder to ``NAME.previous-<UTC time>`` so a fresh run starts empty."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = run_dir.with_name(f"{run_dir.name}.previous-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = run_dir.with_name(f"{run_dir.name}.previous-{stamp}-{n}")
    run_dir.rename(target)
    return target


def tidy_run_folder(run_dir: Path) -> None:
    """Undo what a kill in the middle of an atomic write left behind, in every folder the run writes."""
    folders = [run_dir, run_dir / "checkpoints"]
    stages = run_dir / "stages"
    if stages.is_dir():
        folders += [p for p in stages.iterdir() if p.is_dir()]
    for folder in folders:
        for p in recover_partial_writes(folder):
            logger.info("cleaned %s left by an interrupted write", p)


def open_run(run_dir: Path, resume: bool | str, adapter_name: str) -> RunInfo:
    """Prepare ``run_dir`` for this run (main process only) and return its identity."""
    info = RunInfo.read(run_dir) if run_dir.is_dir() else None
    if resume is False and run_dir.is_dir() and _used(run_dir, adapter_name):
        moved = move_aside(run_dir)
        logger.warning("save.resume is false: the previous run in %s was moved to %s", run_dir, moved)
        info = None
    run_dir.mkdir(parents=True, exist_ok=True)
    tidy_run_folder(run_dir)
    if info is None:
        info = RunInfo(run_id=uuid.uuid4().hex[:12])
        legacy = CheckpointManager(run_dir / "checkpoints", 1).list()
        if legacy:  # checkpoints written before run ids existed belong to this (the only) run
            info.run_id = ""
        info.write(run_dir)
    return info


def is_finished(info: RunInfo, fingerprint: str, run_dir: Path) -> bool:
    """The run already wrote its final output for this very config (and the output is still there)."""
    return (
        info.status == "finished"
        and info.fingerprint == fingerprint
        and bool(info.output)
        and (run_dir / info.output).exists()
    )


def mark_finished(run_dir: Path, info: RunInfo, fingerprint: str, step: int, output: Path) -> None:
    info.fingerprint, info.final_step = fingerprint, step
    info.output = str(output.relative_to(run_dir)) if output.is_relative_to(run_dir) else str(output)
    info.set(run_dir, "finished", step)


def _damaged_name(path: Path) -> Path:
    target = path.with_name(f"{path.name}.damaged")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{n}")
    return target


def newest_readable(ckpts: CheckpointManager) -> tuple[Path, Loaded] | None:
    """The newest checkpoint that loads; damaged newer ones are renamed ``step_N.damaged`` (so a later
    save of the same step cannot replace them) with a warning. None when there is no checkpoint at all;
    :class:`CheckpointError` when there are some and none loads."""
    found = ckpts.list()
    bad = []
    for path in reversed(found):
        try:
            return path, CheckpointManager.load(path)
        except RuntimeError as exc:
            moved = _damaged_name(path)
            path.rename(moved)
            bad.append(str(moved))
            logger.warning(
                "checkpoint %s is unreadable (%s); renamed to %s, trying an older one",
                path,
                exc.__cause__ or exc,
                moved.name,
            )
    if bad:
        raise CheckpointError(
            f"no readable checkpoint in {ckpts.folder}: {', '.join(bad)} are damaged (kept, renamed). "
            "Move them away and set save.resume: false to start over, or save.resume: PATH to pick one"
        )
    return None


def find_resume(ckpts: CheckpointManager, resume: bool | str, is_main: bool) -> tuple[Path, Loaded] | None:
    """The checkpoint ``save.resume`` asks for: a path, or the newest readable one (only the main process
    renames damaged ones; the others call this after it)."""
    if resume is False:
        return None
    if isinstance(resume, str):
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"save.resume: checkpoint '{path}' does not exist")
        try:
            return path, CheckpointManager.load(path)
        except RuntimeError as exc:
            raise CheckpointError(f"save.resume: {exc}") from None
    if is_main:
        return newest_readable(ckpts)
    latest = ckpts.latest()
    return None if latest is None else (latest, CheckpointManager.load(latest))
