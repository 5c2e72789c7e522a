"""Bounded waits for server tests: a regression (a queue limit off by one, a job that never ends) must fail
the test within seconds with a message, never hang the suite."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from eridiffusion.inference.generator import Generator

T = TypeVar("T")

_STRAYS: list[threading.Thread] = []
"""Threads of :func:`bounded` calls that timed out; :class:`Gate` waits for them when it closes."""

GATE_SECONDS = 15.0
"""How long after the first gated job starts the gate stays shut at most: then every job waiting at it,
and every later one, fails on its own."""


def bounded(call: Callable[[], T], seconds: float, what: str) -> T:
    """``call()`` in a daemon thread; an AssertionError naming ``what`` if it has not returned in time.
    (A TestClient request that waits behind a gated job would otherwise block the test thread for good.)"""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # re-raised in the test thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        _STRAYS.append(thread)
        raise AssertionError(f"{what}: no answer within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def wait_until(condition: Callable[[], bool], seconds: float, what: str, poll: float = 0.02) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {seconds:g} s")
        time.sleep(poll)


class Gate:
    """Wraps Generator.generate so each job blocks (reporting step 0 of 2) until the test opens the gate;
    :data:`GATE_SECONDS` after the first job arrived, jobs fail by themselves, so a test that never opens
    it still ends. Use it as ``with TestClient(app) as c, Gate(gen) as gate:``: leaving the block (also on
    a failed assertion) opens the gate and waits for requests stuck behind it, before the client closes
    (closing a TestClient while another thread's request is in flight can hang)."""

    def __init__(self, gen: Generator) -> None:
        self.open = threading.Event()
        self.started = threading.Event()
        self.real = gen.generate
        self.deadline: float | None = None
        gen.generate = self  # type: ignore[method-assign]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.deadline is None:
            self.deadline = time.monotonic() + GATE_SECONDS
        self.started.set()
        on_step = kwargs["on_step"]
        while not self.open.wait(0.01):
            if time.monotonic() > self.deadline:
                raise RuntimeError(f"test gate not opened within {GATE_SECONDS:g} s")
            on_step(0, 2)
        return self.real(*args, **kwargs)

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.open.set()
        while _STRAYS:
            thread = _STRAYS.pop()
            thread.join(GATE_SECONDS)
