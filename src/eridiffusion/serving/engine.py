"""A bounded job queue in front of one :class:`~eridiffusion.inference.generator.Generator`.

One worker thread runs jobs in order: a model's forward pass already uses every core (or the whole GPU),
so running two at once only makes both slower and doubles peak memory. Instead, waiting jobs that can share
a forward batch are run together with the oldest one. Requests beyond the worker wait in
the queue; when ``max_queue`` are waiting the server refuses more at once (429) instead of letting
latency grow without bound. Each job has an id, a progress (steps done / total) and a cancel flag the
sampler checks after every step.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from eridiffusion.device import is_out_of_memory, release_memory
from eridiffusion.inference.generate import GenerateRequest, Preview, StopEarly, make_grid, to_pil
from eridiffusion.inference.generator import GenerationResult, Generator
from eridiffusion.inference.samplers import resolve_sampler
from eridiffusion.serving.metrics import Metrics

logger = logging.getLogger(__name__)


class OutOfDeviceMemory(RuntimeError):
    """A request that does not fit the device even alone; the server stays up and answers 503."""

    def __init__(self, batch: list[Job], exc: BaseException) -> None:
        job = batch[0]
        r = job.request
        super().__init__(
            f"out of device memory generating {_images(job)} image(s) at {r.width}x{r.height}; try fewer "
            "images, a smaller size or the memory options (--vae-tiling, --cpu-offload)"
        )


class QueueFull(Exception):
    """The queue holds ``max_queue`` waiting jobs; the client should retry later."""


class ShuttingDown(Exception):
    """The server is draining for shutdown: running and queued jobs finish, new ones are refused."""


class JobCancelled(Exception):
    """Raised inside the sampler's step callback when the job was cancelled or interrupted."""


@dataclass
class Job:
    request: GenerateRequest
    model: str | None
    loras: list[tuple[str, float]]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: str = "queued"
    """queued | running | done | failed | cancelled"""
    step: int = 0
    total_steps: int = 0
    created: float = field(default_factory=time.time)
    error: str | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    interrupt_event: threading.Event = field(default_factory=threading.Event)
    """A1111's ``/interrupt``: stop sampling and deliver the images as they are (cancel delivers none)."""
    future: Future[GenerationResult] = field(default_factory=Future)
    preview: Image.Image | None = None
    """The latest live preview (a grid of the batch's current estimates), when previews are on."""

    @property
    def progress(self) -> float:
        if self.state == "done":
            return 1.0
        return self.step / self.total_steps if self.total_steps else 0.0


def batch_key(job: Job) -> tuple[object, ...] | None:
    """Jobs with equal keys can share one forward batch and still give each image what it would get
    alone (up to float rounding): same model, LoRAs, size, steps, CFG, negative prompt, sampler and
    ControlNet units (nets, images, weights, windows). Ancestral samplers batch too: each image draws its
    step noise from its own seeded generator. None: run this job alone."""
    r = job.request
    try:
        if r.sampler:
            resolve_sampler(r.sampler)
    except ValueError:
        return None  # an unknown sampler: the job fails alone, with the sampler's message
    if r.init_image is not None or any("<lora:" in p for p in r.prompts):
        return None
    loras = tuple(job.loras)
    controls = tuple(u.key() for u in r.controls)  # one ControlNet input per batch: same nets and images
    return (
        job.model,
        loras,
        r.height,
        r.width,
        r.steps,
        r.guidance_scale,
        r.negative_prompt,
        r.sampler,
        controls,
    )


class JobQueue:
    """Submit jobs, follow them by id, cancel them; keeps the last ``keep_finished`` finished jobs.

    The worker takes the oldest job and, when ``max_batch`` allows, every waiting job with the same
    :func:`batch_key`, and runs them as one batch: on a GPU several images cost little more than one.
    """

    def __init__(
        self,
        generator: Generator,
        metrics: Metrics,
        max_queue: int = 8,
        max_batch: int = 8,
        keep_finished: int = 64,
    ) -> None:
        self.generator = generator
        self.metrics = metrics
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.keep_finished = keep_finished
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.current: Job | None = None
        self.running: list[Job] = []
        """The jobs of the batch being generated (``current`` is the first)."""
        self.batch_seconds: float | None = None
        """Moving average of measured batch run times (None until one ran), for the 429's Retry-After."""
        self._batch_start = 0.0
        self.preview_every = 0
        """Decode a live preview every this many steps; 0: off (each preview costs a VAE decode)."""
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="eri-generate", daemon=True)
        self._worker.start()

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def closing(self) -> bool:
        """True once shutdown began: new jobs are refused while the accepted ones finish."""
        return self._closed

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._closed:
                raise ShuttingDown("server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"queue full ({self.max_queue} jobs waiting)")
            self._pending.append(job)
            self.metrics.queue_depth.set(len(self._pending))
            self.jobs[job.id] = job
            self._forget_old()
            self._cond.notify()
        return job

    def retry_after(self) -> int:
        """Whole seconds until the worker next takes jobs from the queue, which frees its slots: the
        measured mean batch time less what the running batch already used; 1 before any measurement.
        (The waiting jobs do not add up: compatible ones run together in the next batch.)"""
        if self.batch_seconds is None:
            return 1
        elapsed = time.perf_counter() - self._batch_start if self.current is not None else 0.0
        return max(1, math.ceil(self.batch_seconds - elapsed))

    def cancel(self, job_id: str) -> Job:
        job = self.jobs[job_id]
        job.cancel_event.set()
        return job

    def interrupt(self) -> Job | None:
        """Stop the running batch after its current step (A1111's ``/interrupt`` and ``/skip``): its jobs
        finish with the partial images; queued jobs still run. Returns the batch's first job."""
        for job in self.running:
            job.interrupt_event.set()
        return self.current

    def begin_shutdown(self) -> None:
        """Refuse new jobs from now on; the worker still finishes the running and queued ones."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def shutdown(self) -> None:
        """Refuse new jobs, finish the running and queued ones, then stop the worker (graceful shutdown)."""
        self.begin_shutdown()
        self._worker.join()

    def _forget_old(self) -> None:
        finished = [j for j in self.jobs.values() if j.future.done()]
        for j in finished[: max(0, len(finished) - self.keep_finished)]:
            del self.jobs[j.id]

    def _take_batch(self) -> list[Job]:
        """The oldest job plus the waiting jobs that may share its batch (caller holds the lock)."""
        first = self._pending.popleft()
        batch, key = [first], batch_key(first)
        images = _images(first)
        if key is not None:
            for job in list(self._pending):
                if batch_key(job) == key and images + _images(job) <= self.max_batch:
                    self._pending.remove(job)
                    batch.append(job)
                    images += _images(job)
        self.metrics.queue_depth.set(len(self._pending))
        return batch

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                batch = self._take_batch()
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        for job in [j for j in batch if j.cancel_event.is_set()]:
            job.state = "cancelled"
            job.future.set_exception(JobCancelled(f"job {job.id} cancelled"))
        batch = [j for j in batch if not j.cancel_event.is_set()]
        if not batch:
            return
        first = batch[0]
        for job in batch:
            job.state, job.total_steps = "running", job.request.steps
        self.current, self.running = first, batch
        start = self._batch_start = time.perf_counter()

        def on_step(step: int, total: int) -> None:
            for job in batch:
                job.step, job.total_steps = step, total
            if all(j.cancel_event.is_set() for j in batch):
                raise JobCancelled(f"job {first.id} cancelled")
            if all(j.cancel_event.is_set() or j.interrupt_event.is_set() for j in batch):
                raise StopEarly

        def on_preview(step: int, pixels: torch.Tensor) -> None:
            images = to_pil(pixels)
            grid = make_grid(images, len(images)) if len(images) > 1 else images[0]
            for job in batch:
                job.preview = grid

        preview = Preview(self.preview_every, on_preview) if self.preview_every > 0 else None
        oom_split = False
        request = first.request
        if len(batch) > 1:
            request = replace(
                request,
                prompts=[p for j in batch for p in j.request.expanded_prompts()],
                images_per_prompt=1,
                seeds=[s for j in batch for s in j.request.image_seeds()],
            )
        try:
            self.metrics.batch_size.observe(sum(_images(j) for j in batch))
            result = self.generator.generate(
                request, first.model, first.loras, on_step=on_step, preview=preview
            )
        except (JobCancelled, StopEarly) as exc:  # StopEarly here: stopped before sampling began
            cancelled = exc if isinstance(exc, JobCancelled) else JobCancelled(f"job {first.id} interrupted")
            for job in batch:
                job.state = "cancelled"
                job.future.set_exception(cancelled)
        except Exception as exc:
            if is_out_of_memory(exc) and len(batch) > 1:
                oom_split = True  # retried below, outside this block: its traceback holds the batch's tensors
            else:
                failure = OutOfDeviceMemory(batch, exc) if is_out_of_memory(exc) else exc
                for job in batch:
                    job.state, job.error = "failed", str(failure)
                    job.future.set_exception(failure)
        else:
            self._deliver(batch, result)
        finally:
            self.current, self.running = None, []
            took = time.perf_counter() - start
            self.batch_seconds = took if self.batch_seconds is None else 0.7 * self.batch_seconds + 0.3 * took
            self.metrics.cache_bytes.set(self.generator.cache.total_bytes)
        if oom_split:  # the batch did not fit: each job alone (same seeds, so the same images)
            release_memory()
            logger.warning("out of device memory on a batch of %d jobs; running them one by one", len(batch))
            for job in batch:
                self._run([job])

    def _deliver(self, batch: list[Job], result: GenerationResult) -> None:
        """Split a batch's images back into each job's own result, in the job's own request terms."""
        offset = 0
        for job in batch:
            n = _images(job)
            part = slice(offset, offset + n)
            offset += n
            if job.cancel_event.is_set():
                job.state = "cancelled"
                job.future.set_exception(JobCancelled(f"job {job.id} cancelled"))
                continue
            own = replace(
                result.request,
                prompts=job.request.prompts,
                images_per_prompt=job.request.images_per_prompt,
                seed=job.request.seed,
                seeds=job.request.seeds,
            )
            job.state = "done"
            job.future.set_result(
                GenerationResult(
                    result.images[part],
                    result.prompts[part],
                    result.seeds[part],
                    result.parameters[part],
                    own,
                )
            )


def _images(job: Job) -> int:
    return len(job.request.prompts) * job.request.images_per_prompt
