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
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from PIL import Image, ImageOps
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from eridiffusion.inference.controlnet import ControlUnit
from eridiffusion.inference.generate import GenerateRequest, png_info
from eridiffusion.inference.generator import GenerationResult, Generator, pil_to_mask, pil_to_pixels
from eridiffusion.inference.hashing import HashCache
from eridiffusion.inference.inpaint import A1111_FILLS, InpaintOptions
from eridiffusion.inference.samplers import SAMPLERS, resolve_sampler
from eridiffusion.serving.engine import Job, JobCancelled, JobQueue, QueueFull, ShuttingDown
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


def control_pixels(
    data: str, what: str, width: int | None, height: int | None, crop: bool = False
) -> torch.Tensor:
    """A base64 control image as (3, H, W) pixels in [-1, 1], at the output size when the request gives
    it (else at its own size; the sampler resizes it to the model's default). ``crop``: scale to cover
    and cut the overflow centred (the extension's "Crop and Resize") instead of stretching."""
    image = decode_image(data, what).convert("RGB")
    if width is None or height is None:
        width, height = image.size
    elif crop:
        image = ImageOps.fit(image, (width, height), Image.BICUBIC)
    return pil_to_pixels(image, width, height)


def _checked(unit: ControlUnit, what: str) -> ControlUnit:
    try:
        unit.check()
    except ValueError as exc:
        raise HTTPException(422, detail=f"{what}: {exc}") from None
    return unit


def native_controls(body: GenerateBody, req: GenerateRequest) -> GenerateRequest:
    """The native body's ``controlnet`` unit(s), images at the request's size."""
    refs = (
        body.controlnet if isinstance(body.controlnet, list) else [body.controlnet] if body.controlnet else []
    )
    units = [
        _checked(
            ControlUnit(
                model=ref.model,
                image=control_pixels(ref.image, f"controlnet {i} image", req.width, req.height),
                scale=ref.scale,
                guidance_start=ref.guidance_start,
                guidance_end=ref.guidance_end,
            ),
            f"controlnet {i}",
        )
        for i, ref in enumerate(refs)
    ]
    return replace(req, controls=units)


_RESIZE_MODES = {0: "Just Resize", 1: "Crop and Resize", 2: "Resize and Fill"}


def a1111_controls(scripts: dict[str, Any], req: GenerateRequest, fallback: str | None) -> GenerateRequest:
    """sd-webui-controlnet's ``alwayson_scripts: {"controlnet": {"args": [unit, ...]}}``: every enabled
    unit with a model applies (their residuals add up). Units carry already-preprocessed images: the
    extension's preprocessors (``module``) and non-balanced control modes are refused, not silently
    skipped. A unit without an image uses the img2img start image (``fallback``), as the extension does."""
    script = next((v for k, v in scripts.items() if k.lower() == "controlnet"), None)
    if script is None:
        return req
    args = script.get("args") if isinstance(script, dict) else None
    if not isinstance(args, list):
        raise HTTPException(422, detail="alwayson_scripts.controlnet.args must be a list of ControlNet units")
    units = []
    for i, unit in enumerate(args):
        what = f"ControlNet unit {i}"
        if not isinstance(unit, dict):
            raise HTTPException(422, detail=f"{what} must be an object (the extension's named-field format)")
        if not unit.get("enabled", True) or str(unit.get("model") or "none").lower() == "none":
            continue
        module = str(unit.get("module") or "none")
        if module.lower() != "none":
            raise HTTPException(
                422,
                detail=f"{what}: preprocessor {module!r} is not available here; send an already "
                "preprocessed control image (edge/depth/pose map) with module 'none'",
            )
        if unit.get("control_mode", 0) not in (0, "Balanced"):
            raise HTTPException(422, detail=f"{what}: only control_mode 'Balanced' is supported")
        resize = unit.get("resize_mode", "Crop and Resize")
        resize = _RESIZE_MODES.get(resize, resize) if isinstance(resize, int) else resize
        if resize not in ("Just Resize", "Crop and Resize"):
            raise HTTPException(422, detail=f"{what}: resize_mode {resize!r} is not supported")
        image = unit.get("image") or unit.get("input_image")
        image = image.get("image") if isinstance(image, dict) else image
        image = image or fallback
        if not isinstance(image, str):
            raise HTTPException(422, detail=f"{what} has no image")
        try:
            weight, start, end = (
                float(unit.get(k, d))
                for k, d in (("weight", 1.0), ("guidance_start", 0.0), ("guidance_end", 1.0))
            )
        except (TypeError, ValueError) as exc:
            raise HTTPException(422, detail=f"{what}: {exc}") from None
        pixels = control_pixels(
            image, f"{what} image", req.width, req.height, crop=resize == "Crop and Resize"
        )
        units.append(_checked(ControlUnit(str(unit["model"]), pixels, weight, start, end), what))
    return replace(req, controls=units)


_PARAMETER = re.compile(r'\s*([^,:]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict[str, Any]:
    """A1111 ``parameters`` text back into fields: prompt, negative prompt and the ``Key: value`` line."""
    lines = text.strip().split("\n")
    fields: dict[str, Any] = {}
    if lines and lines[-1].startswith("Steps: "):
        # quoted values (the ControlNet extension's ``ControlNet 0: "Model: x, Weight: 1"``) hold commas
        for key, value in _PARAMETER.findall(lines.pop()):
            fields[key] = value[1:-1] if value.startswith('"') else value
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

    def submit(self, job: Job) -> Job:
        """Check limits (422) and queue ``job``; a full queue answers 429 with the expected wait."""
        check_limits(self.settings, job.request)
        try:
            return self.queue.submit(job)
        except ShuttingDown as exc:
            self.metrics.errors.labels("shutting_down").inc()
            raise HTTPException(503, detail=str(exc), headers={"Retry-After": "30"}) from None
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
    return native_controls(body, with_start_image(req, body.init_image, body.mask, body.strength))


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

    @r.get("/controlnets")
    def controlnets() -> dict[str, Any]:
        return {"controlnets": sorted(server.generator.list_controlnets())}

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
        req = a1111_controls(body.alwayson_scripts, a1111_request(body), None)
        return await run_a1111(body, req, "/sdapi/v1/txt2img")

    @r.post("/img2img")
    async def img2img(body: Img2ImgBody) -> ImagesResponse:
        """img2img, and inpainting when ``mask`` is given (white repaints; ``inpainting_mask_invert``: 1
        flips it) with A1111's mask blur, masked-area fill and "only masked" (full-res) options."""
        req = with_start_image(
            a1111_request(body),
            body.init_images[0],
            body.mask,
            body.denoising_strength,
            invert=bool(body.inpainting_mask_invert),
        )
        if req.mask is not None:
            blur_x = body.mask_blur if body.mask_blur is not None else body.mask_blur_x
            blur_y = body.mask_blur if body.mask_blur is not None else body.mask_blur_y
            req = replace(
                req,
                inpaint=InpaintOptions(
                    mask_blur_x=blur_x,
                    mask_blur_y=blur_y,
                    fill=A1111_FILLS[body.inpainting_fill],
                    full_res=body.inpaint_full_res,
                    full_res_padding=body.inpaint_full_res_padding,
                ),
            )
        req = a1111_controls(body.alwayson_scripts, req, body.init_images[0])
        return await run_a1111(body, req, "/sdapi/v1/img2img")

    def options() -> dict[str, Any]:
        return {
            "sd_model_checkpoint": server.checkpoint,
            "live_previews_enable": server.live_previews,
            "show_progress_every_n_steps": server.preview_every,
        }

    @r.get("/options")
    def get_options() -> dict[str, Any]:
        return options()

    @r.post("/options")
    def set_options(body: OptionsBody) -> dict[str, Any]:
        if body.sd_model_checkpoint is not None:
            server.checkpoint = _model_name(server, body.sd_model_checkpoint)
        server.set_previews(body.live_previews_enable, body.show_progress_every_n_steps)
        return options()

    @r.get("/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        """A1111's list with its hashes (sha256 and the 10-digit shorthash, also in the title); hashed
        on first request and cached, so only the first listing after a model changes reads its weights."""
        listed = []
        for name, path in gen.models.items():
            digest = server.hashes.get(path)
            listed.append(
                {
                    "title": f"{name} [{digest.shorthash}]",
                    "model_name": name,
                    "hash": digest.shorthash,
                    "sha256": digest.sha256,
                    "filename": str(path),
                    "config": None,
                }
            )
        return listed

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
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        """The running job's progress; ``current_image`` is its latest live preview (a PNG, base64) when
        ``live_previews_enable`` is on and the client did not ask to skip it."""
        job = server.queue.current
        preview = job.preview if job is not None and server.live_previews else None
        current = None if preview is None or skip_current_image else encode_png(preview, "")
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
            "current_image": current,
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


def controlnet_router(server: Server) -> APIRouter:
    """The read-only endpoints of sd-webui-controlnet's API that clients query before sending units."""
    r = APIRouter(prefix="/controlnet", tags=["a1111"])

    @r.get("/model_list")
    def model_list() -> dict[str, Any]:
        return {"model_list": sorted(server.generator.list_controlnets())}

    @r.get("/module_list")
    def module_list() -> dict[str, Any]:
        """No preprocessors run here: control images come preprocessed."""
        return {"module_list": ["none"], "module_detail": {}}

    @r.get("/version")
    def version() -> dict[str, Any]:
        return {"version": 2}

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
        # refuse new work at once (503), then let the worker finish what it accepted; the join runs in a
        # thread so handlers still awaiting their jobs keep being served while it waits
        server.queue.begin_shutdown()
        await asyncio.to_thread(server.queue.shutdown)

    app = FastAPI(title="EriDiffusion", version="1", lifespan=lifespan)
    app.state.server = server
    auth = [Depends(_auth(server.settings.api_key))]
    app.include_router(native_router(server), dependencies=auth)
    app.include_router(a1111_router(server), dependencies=auth)
    app.include_router(controlnet_router(server), dependencies=auth)

    @app.get("/health", tags=["ops"])
    def health(response: Response) -> dict[str, Any]:
        """503 while draining for shutdown, so load balancers stop routing here."""
        status = "shutting down" if server.queue.closing else "ok"
        if server.queue.closing:
            response.status_code = 503
        return {"status": status, "models": sorted(generator.models), "queue": server.queue.waiting}

    @app.get("/metrics", tags=["ops"], dependencies=auth)
    def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
