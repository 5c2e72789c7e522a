"""The FastAPI app behind ``eri serve``: native ``/v1`` API, A1111 ``/sdapi/v1`` surface, health, metrics.

Handlers never run the model themselves: they check limits, put a job on the
:class:`~eridiffusion.serving.engine.JobQueue` and await its future, so the event loop stays free to
answer ``/progress``, ``/interrupt``, ``/health`` and ``/metrics`` while an image is being generated.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import math
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from eridiffusion.inference.generate import GenerateRequest, png_info
from eridiffusion.inference.generator import GenerationResult, Generator, pil_to_mask, pil_to_pixels
from eridiffusion.inference.samplers import SAMPLERS, resolve_sampler
from eridiffusion.serving.engine import Job, JobCancelled, JobQueue, QueueFull
from eridiffusion.serving.metrics import Metrics
from eridiffusion.serving.schemas import (
    GenerateBody,
    GenerateResponse,
    ImagesResponse,
    Img2ImgBody,
    JobStatus,
    OptionsBody,
    PngInfoBody,
    PngInfoResponse,
    Txt2ImgBody,
)


@dataclass(frozen=True)
class ServeSettings:
    """Per-request limits (violations answer 422), queue size (beyond it 429) and the optional API key."""

    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_images: int = 8
    max_prompt_chars: int = 2000
    max_queue: int = 8
    api_key: str | None = None


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
    if problems:
        raise HTTPException(422, detail="; ".join(problems))


def _auth(api_key: str | None) -> Any:
    """Accept the key as ``Authorization: Bearer KEY``, ``X-API-Key: KEY`` or the password of HTTP Basic
    auth (what A1111 clients configured for ``--api-auth`` send)."""

    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = request.headers.get("x-api-key")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            token = value
        elif scheme.lower() == "basic":
            try:
                token = base64.b64decode(value).decode().partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                token = None
        if token is None or not hmac.compare_digest(token.encode(), api_key.encode()):
            raise HTTPException(
                401, detail="missing or wrong API key", headers={"WWW-Authenticate": "Bearer"}
            )

    return check


def encode_png(image: Image.Image, parameters: str) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(parameters))
    return base64.b64encode(buf.getvalue()).decode()


def decode_image(data: str, what: str = "image") -> Image.Image:
    """A base64 image, with or without a ``data:`` URL prefix; a 422 answer when it is not one."""
    data = data.split(",", 1)[1] if data.startswith("data:") else data
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        image.load()
    except (binascii.Error, OSError, ValueError) as exc:
        raise HTTPException(422, detail=f"{what} is not a base64 image: {exc}") from None
    return image


def with_start_image(
    req: GenerateRequest, init: str | None, mask: str | None, strength: float, invert: bool = False
) -> GenerateRequest:
    """Attach img2img / inpaint inputs; the output size defaults to the start image's."""
    if init is None:
        if mask is not None:
            raise HTTPException(422, detail="a mask needs an init image to inpaint")
        return req
    image = decode_image(init, "init image")
    width, height = req.width or image.width, req.height or image.height
    return replace(
        req,
        width=width,
        height=height,
        init_image=pil_to_pixels(image, width, height),
        strength=strength,
        mask=None if mask is None else pil_to_mask(decode_image(mask, "mask"), width, height, invert),
    )


def parse_parameters(text: str) -> dict[str, Any]:
    """A1111 ``parameters`` text back into fields: prompt, negative prompt and the ``Key: value`` line."""
    lines = text.strip().split("\n")
    fields: dict[str, Any] = {}
    if lines and lines[-1].startswith("Steps: "):
        for part in lines.pop().split(", "):
            key, _, value = part.partition(": ")
            fields[key] = value
    prompt, negative = [], []
    for line in lines:
        if line.startswith("Negative prompt: ") or negative:
            negative.append(line.removeprefix("Negative prompt: "))
        else:
            prompt.append(line)
    return {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **fields}


class Server:
    """What the handlers share: generator, queue, metrics, settings and A1111's selected checkpoint."""

    def __init__(self, generator: Generator, settings: ServeSettings) -> None:
        self.generator = generator
        self.settings = settings
        self.metrics = Metrics()
        self.queue = JobQueue(generator, self.metrics, settings.max_queue, max_batch=settings.max_images)
        self.checkpoint = generator.default_model

    def submit(self, job: Job) -> Job:
        """Check limits (422) and queue ``job``; a full queue answers 429 with the expected wait."""
        check_limits(self.settings, job.request)
        try:
            return self.queue.submit(job)
        except QueueFull as exc:
            self.metrics.errors.labels("queue_full").inc()
            retry = max(1, math.ceil(self.queue.waiting * self.queue.mean_job_seconds))
            raise HTTPException(429, detail=str(exc), headers={"Retry-After": str(retry)}) from None

    async def run(self, job: Job, endpoint: str) -> GenerationResult:
        """Queue ``job`` and wait for it; errors become HTTP answers and count in ``eri_errors_total``."""
        start = time.perf_counter()
        self.submit(job)
        try:
            result = await asyncio.wrap_future(job.future)
        except JobCancelled as exc:
            self.metrics.errors.labels("cancelled").inc()
            raise HTTPException(409, detail=str(exc)) from None
        except (ValueError, FileNotFoundError) as exc:
            self.metrics.errors.labels("invalid").inc()
            raise HTTPException(422, detail=str(exc)) from None
        except Exception as exc:
            self.metrics.errors.labels("internal").inc()
            raise HTTPException(500, detail=f"generation failed: {exc}") from None
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        return result


def _seed(seed: int) -> int:
    return random.randint(0, 2**32 - 1) if seed < 0 else seed


def _native_request(body: GenerateBody) -> GenerateRequest:
    req = GenerateRequest(
        prompts=[body.prompt] if isinstance(body.prompt, str) else list(body.prompt),
        negative_prompt=body.negative_prompt,
        steps=body.steps,
        guidance_scale=body.cfg_scale,
        sampler=body.sampler or "",
        seed=_seed(body.seed),
        height=body.height,
        width=body.width,
        images_per_prompt=body.n,
    )
    return with_start_image(req, body.init_image, body.mask, body.strength)


def _native_response(job: Job, result: GenerationResult) -> GenerateResponse:
    return GenerateResponse(
        id=job.id,
        images=[encode_png(i, p) for i, p in zip(result.images, result.parameters, strict=True)],
        seeds=result.seeds,
        prompts=result.prompts,
        parameters=result.parameters,
        model=result.request.model_name,
        sampler=resolve_sampler(result.request.sampler).label,
    )


def _a1111_sampler(body: Txt2ImgBody) -> str:
    """A1111 names the sampler and (since 1.9) the schedule apart: ``DPM++ 2M`` + ``Karras``."""
    name = body.sampler_name or body.sampler_index
    if body.scheduler and body.scheduler.lower() == "karras" and "karras" not in name.lower():
        name = f"{name} Karras"
    return name


def native_router(server: Server) -> APIRouter:
    r = APIRouter(prefix="/v1", tags=["native"])

    @r.get("/models")
    def models() -> dict[str, Any]:
        return {"models": sorted(server.generator.models), "default": server.generator.default_model}

    @r.post("/generate")
    async def generate(body: GenerateBody) -> GenerateResponse:
        job = Job(_native_request(body), body.model, [(lo.name, lo.weight) for lo in body.loras])
        return _native_response(job, await server.run(job, "/v1/generate"))

    @r.post("/jobs", status_code=202)
    async def submit(body: GenerateBody) -> JobStatus:
        job = Job(_native_request(body), body.model, [(lo.name, lo.weight) for lo in body.loras])
        return _status(server.submit(job))

    @r.get("/jobs/{job_id}")
    def status(job_id: str) -> JobStatus:
        if job_id not in server.queue.jobs:
            raise HTTPException(404, detail=f"no job {job_id}")
        return _status(server.queue.jobs[job_id])

    @r.delete("/jobs/{job_id}")
    def cancel(job_id: str) -> JobStatus:
        if job_id not in server.queue.jobs:
            raise HTTPException(404, detail=f"no job {job_id}")
        return _status(server.queue.cancel(job_id))

    return r


def _status(job: Job) -> JobStatus:
    result = None
    if job.state == "done":
        result = _native_response(job, job.future.result())
    return JobStatus(
        id=job.id,
        state=job.state,
        progress=job.progress,
        step=job.step,
        total_steps=job.total_steps,
        error=job.error,
        result=result,
    )


def a1111_router(server: Server) -> APIRouter:
    r = APIRouter(prefix="/sdapi/v1", tags=["a1111"])
    gen = server.generator

    async def run_a1111(body: Txt2ImgBody, req: GenerateRequest, endpoint: str) -> ImagesResponse:
        model = body.override_settings.get("sd_model_checkpoint", server.checkpoint)
        result = await server.run(Job(req, _model_name(server, model), []), endpoint)
        run = result.request
        info = {
            "prompt": result.prompts[0],
            "all_prompts": result.prompts,
            "negative_prompt": run.negative_prompt,
            "all_negative_prompts": [run.negative_prompt] * len(result.images),
            "seed": result.seeds[0],
            "all_seeds": result.seeds,
            "subseed": -1,
            "all_subseeds": [-1] * len(result.images),
            "width": result.images[0].width,
            "height": result.images[0].height,
            "sampler_name": resolve_sampler(run.sampler).label,
            "cfg_scale": run.guidance_scale,
            "steps": run.steps,
            "batch_size": body.batch_size,
            "denoising_strength": run.strength if run.init_image is not None else 0,
            "sd_model_name": run.model_name,
            "infotexts": result.parameters,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        }
        images = (
            [encode_png(i, p) for i, p in zip(result.images, result.parameters, strict=True)]
            if body.send_images
            else []
        )
        parameters = body.model_dump(exclude={"init_images", "mask"})
        return ImagesResponse(images=images, parameters=parameters, info=json.dumps(info))

    def a1111_request(body: Txt2ImgBody) -> GenerateRequest:
        return GenerateRequest(
            prompts=[body.prompt],
            negative_prompt=body.negative_prompt,
            steps=body.steps,
            guidance_scale=body.cfg_scale,
            sampler=_a1111_sampler(body),
            seed=_seed(body.seed),
            height=body.height,
            width=body.width,
            images_per_prompt=body.batch_size * body.n_iter,
        )

    @r.post("/txt2img")
    async def txt2img(body: Txt2ImgBody) -> ImagesResponse:
        return await run_a1111(body, a1111_request(body), "/sdapi/v1/txt2img")

    @r.post("/img2img")
    async def img2img(body: Img2ImgBody) -> ImagesResponse:
        """img2img, and inpainting when ``mask`` is given (white repaints; ``inpainting_mask_invert``: 1
        flips it). A1111's other inpaint options (mask blur, fill, full-res) are accepted and ignored."""
        req = with_start_image(
            a1111_request(body),
            body.init_images[0],
            body.mask,
            body.denoising_strength,
            invert=bool(body.inpainting_mask_invert),
        )
        return await run_a1111(body, req, "/sdapi/v1/img2img")

    @r.get("/options")
    def get_options() -> dict[str, Any]:
        return {"sd_model_checkpoint": server.checkpoint}

    @r.post("/options")
    def set_options(body: OptionsBody) -> dict[str, Any]:
        if body.sd_model_checkpoint is not None:
            server.checkpoint = _model_name(server, body.sd_model_checkpoint)
        return {"sd_model_checkpoint": server.checkpoint}

    @r.get("/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        return [
            {
                "title": name,
                "model_name": name,
                "hash": None,
                "sha256": None,
                "filename": str(path),
                "config": None,
            }
            for name, path in gen.models.items()
        ]

    @r.get("/samplers")
    def samplers() -> list[dict[str, Any]]:
        return [{"name": s.label, "aliases": [s.key], "options": {}} for s in SAMPLERS.values()]

    @r.get("/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        return [
            {
                "name": "automatic",
                "label": "Automatic",
                "aliases": None,
                "default_rho": -1,
                "need_inner_model": False,
            },
            {
                "name": "karras",
                "label": "Karras",
                "aliases": None,
                "default_rho": 7.0,
                "need_inner_model": False,
            },
        ]

    @r.get("/loras")
    def loras() -> list[dict[str, Any]]:
        return [{"name": n, "alias": n, "path": str(p), "metadata": {}} for n, p in gen.list_loras().items()]

    @r.get("/progress")
    def progress() -> dict[str, Any]:
        job = server.queue.current
        state = {
            "skipped": False,
            "interrupted": bool(job and job.cancel_event.is_set()),
            "job": job.id if job else "",
            "job_count": server.queue.waiting + (1 if job else 0),
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)) if job else "0",
            "job_no": 0,
            "sampling_step": job.step if job else 0,
            "sampling_steps": job.total_steps if job else 0,
        }
        return {
            "progress": job.progress if job else 0.0,
            "eta_relative": 0.0,
            "state": state,
            "current_image": None,
            "textinfo": None,
        }

    @r.post("/interrupt")
    def interrupt() -> dict[str, Any]:
        job = server.queue.interrupt()
        return {"interrupted": job.id if job else None}

    @r.post("/png-info")
    def pnginfo(body: PngInfoBody) -> PngInfoResponse:
        image = decode_image(body.image)
        items = {k: v for k, v in image.info.items() if isinstance(v, str)}
        text = items.get("parameters", "")
        return PngInfoResponse(info=text, items=items, parameters=parse_parameters(text) if text else {})

    return r


def _model_name(server: Server, name: str) -> str:
    """A1111 checkpoint titles look like ``name.safetensors [hash]``; accept those and bare names."""
    bare = name.split(" [", 1)[0].removesuffix(".safetensors")
    if bare not in server.generator.models:
        raise HTTPException(
            422, detail=f"unknown checkpoint {name!r}; available: {sorted(server.generator.models)}"
        )
    return bare


def create_app(generator: Generator, settings: ServeSettings | None = None) -> FastAPI:
    """The server app; ``eri serve`` runs it with uvicorn, tests with FastAPI's TestClient."""
    server = Server(generator, settings or ServeSettings())

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        server.queue.shutdown()

    app = FastAPI(title="EriDiffusion", version="1", lifespan=lifespan)
    app.state.server = server
    auth = [Depends(_auth(server.settings.api_key))]
    app.include_router(native_router(server), dependencies=auth)
    app.include_router(a1111_router(server), dependencies=auth)

    @app.get("/health", tags=["ops"])
    def health() -> dict[str, Any]:
        return {"status": "ok", "models": sorted(generator.models), "queue": server.queue.waiting}

    @app.get("/metrics", tags=["ops"], dependencies=auth)
    def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
