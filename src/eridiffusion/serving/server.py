"""What every route shares: the limits a server enforces, and :class:`Server` (generator, queue, metrics).

Handlers never run the model themselves: they check limits and names, put a job on the
:class:`~eridiffusion.serving.engine.JobQueue` and await its future, so the event loop stays free to
answer ``/progress``, ``/interrupt``, ``/health`` and ``/metrics`` while an image is being generated.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from dataclasses import dataclass

from fastapi import HTTPException

from eridiffusion.inference.generate import GenerateRequest
from eridiffusion.inference.generator import GenerationResult, Generator, UnknownName
from eridiffusion.inference.hashing import HashCache
from eridiffusion.inference.lora_tags import split_lora_tags
from eridiffusion.serving.engine import (
    Job,
    JobCancelled,
    JobQueue,
    OutOfDeviceMemory,
    QueueFull,
    ShuttingDown,
)
from eridiffusion.serving.metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSettings:
    """Per-request limits (violations answer 422, a larger body 413), queue size (beyond it 429), the
    optional API key and whether the API docs are public."""

    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_images: int = 8
    max_prompt_chars: int = 2000
    max_queue: int = 8
    api_key: str | None = None
    max_body_bytes: int = 32 * 2**20
    """Larger request bodies answer 413 before they are read in full (a noisy 2048 px PNG in base64 is
    ~16 MB; raise it for several such images per request)."""
    max_image_pixels: int = 4096 * 4096
    """Pixels of any image a request sends, checked from its header before it is decoded."""
    public_docs: bool = False
    """Serve /docs, /redoc and /openapi.json without the API key (``--public-docs``)."""

    def __post_init__(self) -> None:
        if self.api_key == "":
            raise ValueError(
                "the API key is empty, which would serve without authentication; give a key, or leave "
                "--api-key and ERI_API_KEY unset to serve without one"
            )
        for name in ("max_body_bytes", "max_image_pixels", "max_queue", "max_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


def check_limits(s: ServeSettings, req: GenerateRequest) -> None:
    problems = []
    if (req.width or 0) > s.max_width or (req.height or 0) > s.max_height:
        problems.append(f"size above the limit {s.max_width}x{s.max_height}")
    if req.steps > s.max_steps:
        problems.append(f"steps {req.steps} above the limit {s.max_steps}")
    n = len(req.prompts) * req.images_per_prompt
    if n > s.max_images:
        problems.append(f"{n} images requested, the limit is {s.max_images}")
    if any(len(p) > s.max_prompt_chars for p in (*req.prompts, req.negative_prompt)):
        problems.append(f"prompt longer than {s.max_prompt_chars} characters")
    if not math.isfinite(req.guidance_scale) or not math.isfinite(req.strength):
        problems.append("cfg scale and strength must be finite numbers")
    if problems:
        raise HTTPException(422, detail="; ".join(problems))


def not_found(exc: UnknownName) -> HTTPException:
    """A name that resolves to nothing loadable here: 404 with the name only, never a server path."""
    return HTTPException(404, detail=str(exc))


def seed_or_random(seed: int) -> int:
    return random.randint(0, 2**32 - 1) if seed < 0 else seed


class Server:
    """What the handlers share: generator, queue, metrics, settings and A1111's selected checkpoint."""

    def __init__(self, generator: Generator, settings: ServeSettings) -> None:
        if generator.allow_paths:
            raise ValueError(
                "a served Generator must have allow_paths=False: clients may only name models, LoRAs and "
                "ControlNets inside the folders the server was given"
            )
        self.generator = generator
        self.settings = settings
        self.metrics = Metrics()
        self.queue = JobQueue(generator, self.metrics, settings.max_queue, max_batch=settings.max_images)
        self.checkpoint = generator.default_model
        self.hashes = HashCache()
        self.live_previews = False
        """A1111's ``live_previews_enable``; off by default here, since each preview costs a VAE decode."""
        self.preview_every = 10
        """A1111's ``show_progress_every_n_steps``."""
        self.metrics.watch_memory(lambda: generator.cache.total_bytes)

    def set_previews(self, enabled: bool | None, every: int | None) -> None:
        self.live_previews = self.live_previews if enabled is None else enabled
        self.preview_every = self.preview_every if every is None else every
        self.queue.preview_every = self.preview_every if self.live_previews else 0

    def check_names(self, job: Job) -> None:
        """Resolve the job's model, LoRAs (fields and ``<lora:...>`` tags) and ControlNets now, inside the
        configured folders: an unknown name answers 404 at once instead of taking a queue slot."""
        gen = self.generator
        try:
            gen.model_path(job.model)
            for prompt in job.request.prompts:
                for tag in split_lora_tags(prompt)[1]:
                    gen.resolve_lora(tag.name)
            for name, _ in job.loras:
                gen.resolve_lora(name)
            for unit in job.request.controls:
                gen.resolve_controlnet(unit.model)
        except UnknownName as exc:
            self.metrics.errors.labels("unknown_name").inc()
            raise not_found(exc) from None
        except ValueError as exc:  # a <lora:...> tag that cannot be read (lbw=, not a number, ...)
            raise HTTPException(422, str(exc)) from None

    def submit(self, job: Job) -> Job:
        """Check limits (422) and names (404) and queue ``job``; a full queue answers 429 with the time
        until the worker next takes jobs from it, from measured batch times."""
        check_limits(self.settings, job.request)
        self.check_names(job)
        try:
            return self.queue.submit(job)
        except ShuttingDown as exc:
            self.metrics.errors.labels("shutting_down").inc()
            raise HTTPException(503, detail=str(exc), headers={"Retry-After": "30"}) from None
        except QueueFull as exc:
            self.metrics.errors.labels("queue_full").inc()
            retry = str(self.queue.retry_after())
            raise HTTPException(429, detail=str(exc), headers={"Retry-After": retry}) from None

    async def run(self, job: Job, endpoint: str) -> GenerationResult:
        """Queue ``job`` and wait for it; errors become HTTP answers and count in ``eri_errors_total``.
        An unexpected failure is logged with its traceback; the client gets its type only (a message
        could hold server paths)."""
        start = time.perf_counter()
        self.submit(job)
        try:
            result = await asyncio.wrap_future(job.future)
        except JobCancelled as exc:
            self.metrics.errors.labels("cancelled").inc()
            raise HTTPException(409, detail=str(exc)) from None
        except UnknownName as exc:
            self.metrics.errors.labels("unknown_name").inc()
            raise not_found(exc) from None
        except (ValueError, FileNotFoundError) as exc:
            self.metrics.errors.labels("invalid").inc()
            raise HTTPException(422, detail=str(exc)) from None
        except OutOfDeviceMemory as exc:
            self.metrics.errors.labels("out_of_memory").inc()
            raise HTTPException(503, detail=str(exc), headers={"Retry-After": "5"}) from None
        except Exception as exc:
            logger.exception("job %s failed", job.id)
            self.metrics.errors.labels("internal").inc()
            raise HTTPException(500, detail=f"generation failed: {type(exc).__name__}") from None
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        return result
