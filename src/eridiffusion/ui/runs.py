"""Reading run folders for the UI: only files, no database, so runs started from the CLI show up too.

A run folder ``RUNS/NAME/`` is whatever the trainer wrote (``run.json``, ``config.yaml``,
``metrics.jsonl``, ``samples/``, ``checkpoints/``, ``stages/``...; see the README's "What a run writes").
Every path a browser names goes through :func:`resolve_inside`, which resolves symlinks and ``..`` first
and answers the same :class:`NotFound` for a missing path and one outside the folder, so a client cannot
probe the disk.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import yaml

STEP_FILE = re.compile(r"^step_(\d+)(\.png)?$")
LOSS_KEYS = ("loss", "rec_loss")
"""Metric keys shown as a run's "last loss", in order of preference (an autoencoder step logs rec_loss)."""


class NotFound(Exception):  # noqa: N818 (answered as 404, not a failure of the UI)
    """A name that is missing or not allowed; one message for both."""

    def __init__(self, name: str) -> None:
        super().__init__(f"not found: {name[:200]!r}")


def resolve_inside(root: Path, relative: str) -> Path:
    """``root/relative`` after resolving symlinks and ``..``, if it exists inside ``root``."""
    if not relative or "\x00" in relative or Path(relative).is_absolute():
        raise NotFound(relative)
    base = root.resolve()
    try:
        path = (base / relative).resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a name the OS refuses
        raise NotFound(relative) from None
    if path == base or not path.is_relative_to(base) or not path.exists():
        raise NotFound(relative)
    return path


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a zombie counts as gone: its run is over)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def is_trainer(pid: int) -> bool:
    """Whether ``pid`` is an ``eri train`` process (a stale or forged pid in run.json is never signalled)."""
    if not pid_alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    words = [a.decode(errors="replace") for a in argv]
    return "train" in words and any("eri" in w for w in words)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_status(info: dict[str, Any]) -> str:
    """run.json's status, where ``running`` with a dead pid (a killed trainer) reads as interrupted."""
    status = str(info.get("status", "unknown"))
    if status == "running" and not pid_alive(int(info.get("pid") or 0)):
        return "interrupted"
    return status


def read_metrics(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Complete JSON lines of ``metrics.jsonl`` from byte ``offset``, and the offset to ask from next.

    An offset past the end (the file was replaced: a fresh run moved the old one aside) starts over."""
    try:
        size = path.stat().st_size
    except OSError:
        return [], 0
    if offset < 0 or offset > size:
        offset = 0
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read(size - offset)
    end = data.rfind(b"\n") + 1  # a line the trainer is still writing waits for the next poll
    rows = []
    for line in data[:end].splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows, offset + end


def last_loss(path: Path) -> float | None:
    """The newest logged loss, read from the file's tail only."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        for key in LOSS_KEYS:
            if isinstance(row, dict) and isinstance(row.get(key), int | float):
                return float(row[key])
    return None


def _config(run_dir: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _family(cfg: dict[str, Any]) -> str:
    model = cfg.get("model") or {}
    if model.get("arch"):
        return str(model["arch"])
    return Path(str(model.get("name_or_path") or "?")).name


def _stamp(path: Path) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(path.stat().st_mtime))
    except OSError:
        return ""


def run_summary(run_dir: Path) -> dict[str, Any]:
    """One row of the runs table."""
    info = read_json(run_dir / "run.json") or {}
    cfg = _config(run_dir)
    return {
        "name": run_dir.name,
        "family": _family(cfg),
        "network": (cfg.get("network") or {}).get("type") if isinstance(cfg.get("network"), dict) else None,
        "status": run_status(info),
        "step": int(info.get("step") or 0),
        "last_loss": last_loss(run_dir / "metrics.jsonl"),
        "started": _stamp(run_dir / "config.yaml"),
        "updated": str(info.get("updated", "")),
        "error": str(info.get("error", "")),
        "pid": int(info.get("pid") or 0) if run_status(info) == "running" else 0,
    }


def list_runs(root: Path) -> list[dict[str, Any]]:
    """Every run folder (one with a run.json) directly in ``root``, newest first."""
    base = root.resolve()
    if not base.is_dir():
        return []
    runs = []
    for child in base.iterdir():
        if child.name.startswith(".") or not (child / "run.json").is_file():
            continue
        if not child.resolve().is_relative_to(base):  # a symlink to a folder elsewhere
            continue
        runs.append(run_summary(child))
    return sorted(runs, key=lambda r: r["started"], reverse=True)


def run_folder(root: Path, name: str) -> Path:
    """The folder of run ``name`` (a plain name, no separators), or NotFound."""
    if "/" in name or "\\" in name or name.startswith("."):
        raise NotFound(name)
    path = resolve_inside(root, name)
    if not (path / "run.json").is_file():
        raise NotFound(name)
    return path


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _steps(folder: Path, suffix: str = "") -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = STEP_FILE.match(p.name)
        if m and (m.group(2) or "") == suffix:
            found.append((int(m.group(1)), p))
    return sorted(found)


def _stages(run_dir: Path, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Pipeline steps in order, with their eval scores and what they wrote."""
    folder = run_dir / "stages"
    stages = []
    if folder.is_dir():
        for p in sorted(folder.iterdir(), key=lambda p: int(p.name.split("-")[0] or 0)):
            index, _, name = p.name.partition("-")
            if not p.is_dir() or not index.isdigit():
                continue
            stages.append(
                {
                    "index": int(index),
                    "name": name,
                    "eval": read_json(p / "eval.json"),
                    "eval_grid": f"stages/{p.name}/eval_grid.png"
                    if (p / "eval_grid.png").is_file()
                    else None,
                    "summary": summary.get(name),
                }
            )
    return stages


def _downloads(run_dir: Path, info: dict[str, Any]) -> list[dict[str, Any]]:
    """The files a user takes away: the final model or adapter, and each pipeline step's adapter."""
    found: list[Path] = []
    output = str(info.get("output") or "")
    if output and not Path(output).is_absolute():
        found.append(run_dir / output)
    found += sorted(run_dir.glob("*.safetensors"))
    found += sorted(run_dir.glob("stages/*/*.safetensors"))
    if (run_dir / "model").is_dir():
        found.append(run_dir / "model")
    seen, out = set(), []
    for p in found:
        rel = p.relative_to(run_dir).as_posix()
        if rel in seen or not p.exists():
            continue
        seen.add(rel)
        out.append({"path": rel, "size": _size(p), "folder": p.is_dir()})
    return out


def run_detail(root: Path, name: str) -> dict[str, Any]:
    """Everything the run page shows except the metrics and the log (fetched on their own)."""
    run_dir = run_folder(root, name)
    info = read_json(run_dir / "run.json") or {}
    summary = read_json(run_dir / "pipeline_summary.json") or {}
    try:
        config_text = (run_dir / "config.yaml").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        config_text = ""
    samples = [{"step": s, "path": f"samples/{p.name}"} for s, p in _steps(run_dir / "samples", ".png")]
    checkpoints = [
        {
            "step": s,
            "path": f"checkpoints/{p.name}",
            "size": _size(p),
            "files": sorted(c.name for c in p.iterdir()),
        }
        for s, p in _steps(run_dir / "checkpoints")
        if p.is_dir()
    ]
    return {
        **run_summary(run_dir),
        "run": info,
        "config": config_text,
        "samples": samples,
        "checkpoints": checkpoints,
        "stages": _stages(run_dir, summary if isinstance(summary, dict) else {}),
        "eval": read_json(run_dir / "eval.json"),
        "downloads": _downloads(run_dir, info),
    }


def tail(path: Path, lines: int = 200, max_bytes: int = 256 * 1024) -> str:
    """The last ``lines`` lines of a log; progress-bar redraws (``\\r``) keep only their final state."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    kept = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    return "\n".join(kept[-lines:])
