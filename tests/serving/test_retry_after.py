"""The 429's Retry-After comes from measured batch times: the time until the worker next takes jobs
from the queue (which frees its slots), not the number of waiting jobs times a guess."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from eridiffusion.inference.generate import GenerateRequest
from eridiffusion.serving.engine import Job, JobQueue
from eridiffusion.serving.metrics import Metrics
from tests.serving.waits import wait_until


class _Timed:
    """A stand-in generator whose every batch takes ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.cache = SimpleNamespace(total_bytes=0)

    def generate(self, request: GenerateRequest, *args: Any, **kwargs: Any) -> Any:
        time.sleep(self.seconds)
        raise RuntimeError("no images here")


def test_retry_after_is_the_measured_batch_time_left() -> None:
    queue = JobQueue(_Timed(0.2), Metrics(), max_queue=4)  # type: ignore[arg-type]
    try:
        assert queue.retry_after() == 1  # nothing measured yet
        job = queue.submit(Job(GenerateRequest(["a"]), None, []))
        wait_until(job.future.done, 10, "the job")
        assert queue.batch_seconds is not None and 0.2 <= queue.batch_seconds < 5
        queue.batch_seconds = 7.5  # as if batches took 7.5 s
        assert queue.retry_after() == 8  # idle worker: a full batch
        queue.current = job  # a batch running for 3 s already
        queue._batch_start = time.perf_counter() - 3
        assert queue.retry_after() == 5
        queue._batch_start = time.perf_counter() - 60  # overdue: retry soon, never 0
        assert queue.retry_after() == 1
        queue.current = None
    finally:
        queue.shutdown()
