"""The AUTOMATIC1111 ``/sdapi/v1`` surface and sd-webui-controlnet's ``/controlnet`` lists, so unmodified
A1111 clients (webuiapi, Krita and ComfyUI bridges, scripts) drive this server."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, HTTPException

from eridiffusion.inference.controlnet import ControlUnit
from eridiffusion.inference.generate import GenerateRequest
from eridiffusion.inference.generator import UnknownName
from eridiffusion.inference.inpaint import A1111_FILLS, InpaintOptions
from eridiffusion.inference.samplers import SAMPLERS, resolve_sampler
from eridiffusion.serving.a1111_compat import info_extras, parse_parameters, refuse_unsupported
from eridiffusion.serving.engine import Job
from eridiffusion.serving.inputs import (
    checked_unit,
    control_pixels,
    decode_image,
    encode_png,
    with_start_image,
)
from eridiffusion.serving.schemas import (
    MAX_CONTROL_WEIGHT,
    ImagesResponse,
    Img2ImgBody,
    OptionsBody,
    PngInfoBody,
    PngInfoResponse,
    Txt2ImgBody,
)
from eridiffusion.serving.server import Server, check_limits, not_found, seed_or_random

_RESIZE_MODES = {0: "Just Resize", 1: "Crop and Resize", 2: "Resize and Fill"}


def a1111_controls(
    scripts: dict[str, Any], req: GenerateRequest, fallback: str | None, max_pixels: int
) -> GenerateRequest:
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
                detail=f"{what}: preprocessor {module[:64]!r} is not available here; send an already "
                "preprocessed control image (edge/depth/pose map) with module 'none'",
            )
        if unit.get("control_mode", 0) not in (0, "Balanced"):
            raise HTTPException(422, detail=f"{what}: only control_mode 'Balanced' is supported")
        resize = unit.get("resize_mode", "Crop and Resize")
        resize = _RESIZE_MODES.get(resize, resize) if isinstance(resize, int) else resize
        if resize not in ("Just Resize", "Crop and Resize"):
            raise HTTPException(422, detail=f"{what}: resize_mode {str(resize)[:64]!r} is not supported")
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
        except (TypeError, ValueError, OverflowError) as exc:
            raise HTTPException(422, detail=f"{what}: {exc}") from None
        if abs(weight) > MAX_CONTROL_WEIGHT:
            raise HTTPException(422, detail=f"{what}: weight {weight} is outside +-{MAX_CONTROL_WEIGHT:g}")
        pixels = control_pixels(
            image, f"{what} image", req.width, req.height, max_pixels, crop=resize == "Crop and Resize"
        )
        units.append(checked_unit(ControlUnit(str(unit["model"]), pixels, weight, start, end), what))
    return replace(req, controls=units)


def a1111_sampler(body: Txt2ImgBody) -> str:
    """A1111 names the sampler and (since 1.9) the schedule apart: ``DPM++ 2M`` + ``Karras``."""
    name = body.sampler_name or body.sampler_index
    if body.scheduler and body.scheduler.lower() == "karras" and "karras" not in name.lower():
        name = f"{name} Karras"
    return name


def model_name(server: Server, name: Any) -> str:
    """A1111 checkpoint titles look like ``name.safetensors [hash]``; accept those and bare names. Any
    other name answers 404 (the same text for every unknown name; only served names are listed)."""
    if not isinstance(name, str):
        raise HTTPException(422, detail="sd_model_checkpoint must be a string")
    bare = name.split(" [", 1)[0].removesuffix(".safetensors")
    if bare not in server.generator.models:
        raise not_found(UnknownName("checkpoint", name, f"available: {sorted(server.generator.models)}"))
    return bare


def a1111_router(server: Server) -> APIRouter:
    r = APIRouter(prefix="/sdapi/v1", tags=["a1111"])
    gen = server.generator
    max_pixels = server.settings.max_image_pixels

    def title(name: str) -> str:
        """A1111's checkpoint title, ``name [shorthash]`` (hashed once per file version, then cached)."""
        return f"{name} [{server.hashes.get(gen.models[name]).shorthash}]"

    async def run_a1111(body: Txt2ImgBody, req: GenerateRequest, endpoint: str) -> ImagesResponse:
        """Run and answer in A1111's shape; an ``/interrupt`` mid-run answers 200 with partial images."""
        model = model_name(server, body.override_settings.get("sd_model_checkpoint", server.checkpoint))
        result = await server.run(Job(req, model, []), endpoint)
        run = result.request
        info = {
            **info_extras(server.hashes.get(gen.models[model]).shorthash),
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
        parameters = {k: v for k, v in body.known_fields().items() if k not in ("init_images", "mask")}
        return ImagesResponse(images=images, parameters=parameters, info=json.dumps(info))

    def a1111_request(body: Txt2ImgBody) -> GenerateRequest:
        """The request without images; its limits are checked here, before any image is decoded."""
        req = GenerateRequest(
            prompts=[body.prompt],
            negative_prompt=body.negative_prompt,
            steps=body.steps,
            guidance_scale=body.cfg_scale,
            sampler=a1111_sampler(body),
            seed=seed_or_random(body.seed),
            height=body.height,
            width=body.width,
            images_per_prompt=body.batch_size * body.n_iter,
        )
        check_limits(server.settings, req)
        return req

    @r.post("/txt2img")
    async def txt2img(body: Txt2ImgBody) -> ImagesResponse:
        refuse_unsupported(body)
        req = a1111_controls(body.alwayson_scripts, a1111_request(body), None, max_pixels)
        return await run_a1111(body, req, "/sdapi/v1/txt2img")

    @r.post("/img2img")
    async def img2img(body: Img2ImgBody) -> ImagesResponse:
        """img2img, and inpainting when ``mask`` is given (white repaints; ``inpainting_mask_invert``: 1
        flips it) with A1111's mask blur, masked-area fill and "only masked" (full-res) options."""
        refuse_unsupported(body)
        req = with_start_image(
            a1111_request(body),
            body.init_images[0],
            body.mask,
            body.denoising_strength,
            max_pixels,
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
        req = a1111_controls(body.alwayson_scripts, req, body.init_images[0], max_pixels)
        return await run_a1111(body, req, "/sdapi/v1/img2img")

    def options() -> dict[str, Any]:
        return {
            "sd_model_checkpoint": title(server.checkpoint),
            "live_previews_enable": server.live_previews,
            "show_progress_every_n_steps": server.preview_every,
        }

    @r.get("/options")
    def get_options() -> dict[str, Any]:
        return options()

    @r.post("/options")
    def set_options(body: OptionsBody) -> dict[str, Any]:
        if body.sd_model_checkpoint is not None:
            server.checkpoint = model_name(server, body.sd_model_checkpoint)
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
                    "title": title(name),
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
            "interrupted": bool(job and (job.cancel_event.is_set() or job.interrupt_event.is_set())),
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
        image = decode_image(body.image, "image", max_pixels)
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
