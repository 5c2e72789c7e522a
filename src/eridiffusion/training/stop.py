"""Stopping a run gracefully: the first SIGINT (Ctrl-C) or SIGTERM lets the current optimizer step finish,
writes a checkpoint and ends the run as resumable; a second one interrupts at once.

With several processes every process must stop after the same step, or the next collective would wait
forever: the request is combined across processes after each step (one tiny all-reduce).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

EXIT_STOPPED = 130
"""Exit status of a run stopped on request (resumable), as shells report a Ctrl-C."""


class TrainingStopped(Exception):  # noqa: N818 (not an error: the run ended as asked)
    """The run was stopped on request after a checkpoint; running the same command resumes it."""


class StopRequest:
    """A flag set by SIGINT/SIGTERM while :meth:`installed` is active."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.requested:  # a second signal: stop now, as without this handler
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        logger.warning(
            "%s: finishing this step, then saving a checkpoint (again to stop at once)", self.signal_name
        )

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def agreed(self, world: int, device: torch.device) -> bool:
        """Whether any process was asked to stop (the same answer on every process)."""
        if world == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag)
        return bool(flag.item() > 0)
