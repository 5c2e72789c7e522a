"""What the UI tests share: bounded waits and configs for short jobs."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tests.conftest import tiny_job, write_yaml

T = TypeVar("T")


def wait_for(check: Callable[[], T], seconds: float, what: str, every: float = 0.1) -> T:
    """Poll ``check`` until it is truthy; an AssertionError naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen within {seconds:g} s")
        time.sleep(every)


def job_config(root: Path, steps: int, train: dict[str, Any] | None = None, **sections: Any) -> Path:
    """``root/configs/job.yaml``: a tiny run named ``t`` whose data lives in ``root``; checkpoints only at the
    end or on a stop; ``train`` updates the train section."""
    job = tiny_job(root, **sections)
    job["train"].update(steps=steps, **(train or {}))
    job["save"] = {"every": 1000, "keep": 2}
    (root / "configs").mkdir(exist_ok=True)
    return write_yaml(root / "configs" / "job.yaml", job)
