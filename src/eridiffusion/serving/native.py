"""The native ``/v1`` API: generate (waiting or as a job), job status and cancel, model and ControlNet
lists."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from fastapi import APIRouter, HTTPException

from eridiffusion.inference.controlnet import ControlUnit
from eridiffusion.inference.generate import GenerateRequest
from eridiffusion.inference.generator import GenerationResult
from eridiffusion.inference.samplers import resolve_sampler
from eridiffusion.serving.engine import Job
from eridiffusion.serving.inputs import checked_unit, control_pixels, encode_png, with_start_image
from eridiffusion.serving.schemas import GenerateBody, GenerateResponse, JobStatus
from eridiffusion.serving.server import Server, ServeSettings, check_limits, seed_or_random


def native_controls(body: GenerateBody, req: GenerateRequest, max_pixels: int) -> GenerateRequest:
    """The native body's ``controlnet`` unit(s), images at the request's size."""
    refs = (
        body.controlnet if isinstance(body.controlnet, list) else [body.controlnet] if body.controlnet else []
    )
    units = [
        checked_unit(
            ControlUnit(
                model=ref.model,
                image=control_pixels(ref.image, f"controlnet {i} image", req.width, req.height, max_pixels),
                scale=ref.scale,
                guidance_start=ref.guidance_start,
                guidance_end=ref.guidance_end,
            ),
            f"controlnet {i}",
        )
        for i, ref in enumerate(refs)
    ]
    return replace(req, controls=units)


def native_job(body: GenerateBody, settings: ServeSettings) -> Job:
    """The job a native body asks for; limits are checked before any image is decoded or resized."""
    req = GenerateRequest(
        prompts=[body.prompt] if isinstance(body.prompt, str) else list(body.prompt),
        negative_prompt=body.negative_prompt,
        steps=body.steps,
        guidance_scale=body.cfg_scale,
        sampler=body.sampler or "",
        seed=seed_or_random(body.seed),
        height=body.height,
        width=body.width,
        images_per_prompt=body.n,
    )
    check_limits(settings, req)
    max_pixels = settings.max_image_pixels
    req = with_start_image(req, body.init_image, body.mask, body.strength, max_pixels)
    req = native_controls(body, req, max_pixels)
    return Job(req, body.model, [(lo.name, lo.weight) for lo in body.loras])


def native_response(job: Job, result: GenerationResult) -> GenerateResponse:
    return GenerateResponse(
        id=job.id,
        images=[encode_png(i, p) for i, p in zip(result.images, result.parameters, strict=True)],
        seeds=result.seeds,
        prompts=result.prompts,
        parameters=result.parameters,
        model=result.request.model_name,
        sampler=resolve_sampler(result.request.sampler).label,
    )


def job_status(job: Job) -> JobStatus:
    result = None
    if job.state == "done":
        result = native_response(job, job.future.result())
    return JobStatus(
        id=job.id,
        state=job.state,
        progress=job.progress,
        step=job.step,
        total_steps=job.total_steps,
        error=job.error,
        result=result,
    )


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
        job = native_job(body, server.settings)
        return native_response(job, await server.run(job, "/v1/generate"))

    @r.post("/jobs", status_code=202)
    async def submit(body: GenerateBody) -> JobStatus:
        return job_status(server.submit(native_job(body, server.settings)))

    def known(job_id: str) -> Job:
        if job_id not in server.queue.jobs:
            raise HTTPException(404, detail=f"no job {job_id[:64]!r}")
        return server.queue.jobs[job_id]

    @r.get("/jobs/{job_id}")
    def status(job_id: str) -> JobStatus:
        return job_status(known(job_id))

    @r.delete("/jobs/{job_id}")
    def cancel(job_id: str) -> JobStatus:
        return job_status(server.queue.cancel(known(job_id).id))

    return r
