"""The parts of A1111's API that are about fitting in, not generating: the fields this server refuses
rather than ignores, the ``info`` keys clients read, ``png-info``'s parser, and the cheap read-only and
refresh endpoints clients call at start-up (empty lists where this server has no such thing)."""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from fastapi import APIRouter, HTTPException

from eridiffusion import __version__
from eridiffusion.serving.schemas import Txt2ImgBody
from eridiffusion.serving.server import Server

UNSUPPORTED = {
    "enable_hr": "hires fix (enable_hr) is not supported: generate at the final size, or upscale the image "
    "and send it to img2img",
    "styles": "prompt styles are not supported (GET /sdapi/v1/prompt-styles lists none): put the style's "
    "text in the prompt",
    "subseed_strength": "variation seeds (subseed_strength) are not supported",
    "seed_resize_from_w": "seed resize (seed_resize_from_w/h) is not supported",
    "seed_resize_from_h": "seed resize (seed_resize_from_w/h) is not supported",
    "restore_faces": "face restoration (restore_faces) is not supported",
    "tiling": "tiling is not supported",
    "script_name": "scripts (script_name) are not supported; GET /sdapi/v1/scripts lists none",
    "script_args": "scripts (script_args) are not supported; GET /sdapi/v1/scripts lists none",
}
"""A1111 fields that would change the image, by the message a request setting them gets (422): this
server never silently ignores one. Their defaults (false, 0, -1, empty, "None") are accepted."""


def _is_set(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value > 0
    if isinstance(value, str):
        return value.strip().lower() not in ("", "none")
    return bool(value)


def refuse_unsupported(body: Txt2ImgBody) -> None:
    """422 naming every A1111 field in ``body`` that asks for something this server does not do."""
    extra = body.model_extra or {}
    problems = sorted({UNSUPPORTED[k] for k, v in extra.items() if k in UNSUPPORTED and _is_set(v)})
    if problems:
        raise HTTPException(422, detail="; ".join(problems))


def info_extras(model_hash: str) -> dict[str, Any]:
    """``info`` keys A1111 clients read beyond the generation's own values, with what they mean here."""
    return {
        "sd_model_hash": model_hash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "index_of_first_image": 0,
        "extra_generation_params": {},
        "styles": [],
        "clip_skip": 1,
        "restore_faces": False,
        "face_restoration_model": None,
        "subseed_strength": 0,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "is_using_inpainting_conditioning": False,
        "version": f"eridiffusion {__version__}",
    }


_PARAMETER = re.compile(r'\s*([^,:]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_parameters(text: str) -> dict[str, Any]:
    """A1111 ``parameters`` text back into fields, as A1111's own parser returns them: prompt, negative
    prompt and the ``Key: value`` line, with ``WxH`` values split into ``Key-1`` / ``Key-2``."""
    lines = text.strip().split("\n")
    fields: dict[str, Any] = {}
    if lines and lines[-1].startswith("Steps: "):
        # quoted values (the ControlNet extension's ``ControlNet 0: "Model: x, Weight: 1"``) hold commas
        for key, value in _PARAMETER.findall(lines.pop()):
            value = value[1:-1] if value.startswith('"') else value
            size = _SIZE.match(value)
            if size:
                fields[f"{key}-1"], fields[f"{key}-2"] = size.groups()
            else:
                fields[key] = value
    prompt, negative = [], []
    for line in lines:
        if line.startswith("Negative prompt: ") or negative:
            negative.append(line.removeprefix("Negative prompt: "))
        else:
            prompt.append(line)
    return {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **fields}


def _memory() -> dict[str, Any]:
    """A1111's ``/memory``: system RAM and, with CUDA, the device's memory (bytes)."""
    page = os.sysconf("SC_PAGE_SIZE")
    total, free = os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
    ram = {"free": float(free), "used": float(total - free), "total": float(total)}
    if not torch.cuda.is_available():
        return {"ram": ram, "cuda": {"error": "no CUDA device"}}
    gpu_free, gpu_total = torch.cuda.mem_get_info()
    stats = torch.cuda.memory_stats()

    def pair(key: str) -> dict[str, float]:
        return {
            "current": float(stats.get(f"{key}.all.current", 0)),
            "peak": float(stats.get(f"{key}.all.peak", 0)),
        }

    cuda = {
        "system": {"free": float(gpu_free), "used": float(gpu_total - gpu_free), "total": float(gpu_total)},
        "active": pair("active_bytes"),
        "allocated": pair("allocated_bytes"),
        "reserved": pair("reserved_bytes"),
        "inactive": pair("inactive_split_bytes"),
        "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
    }
    return {"ram": ram, "cuda": cuda}


def compat_router(server: Server) -> APIRouter:
    """Refresh, skip and the read-only lists A1111 clients query; nothing here runs a model."""
    r = APIRouter(prefix="/sdapi/v1", tags=["a1111"])
    gen, settings = server.generator, server.settings

    @r.post("/refresh-checkpoints")
    def refresh_checkpoints() -> None:
        """Discover the ``--model`` folders again (new checkpoints appear in ``/sd-models``)."""
        gen.refresh_models()
        if server.checkpoint not in gen.models:
            server.checkpoint = gen.default_model

    @r.post("/refresh-loras")
    def refresh_loras() -> None:
        """LoRA folders are read on every listing and request: nothing to refresh."""

    @r.post("/refresh-vae")
    def refresh_vae() -> None:
        """No separate VAEs here: nothing to refresh."""

    @r.post("/skip")
    def skip() -> None:
        """A1111 skips to the next image of a batch; one batch runs at a time here, so like
        ``/interrupt`` it ends the running one with its partial images."""
        server.queue.interrupt()

    @r.get("/memory")
    def memory() -> dict[str, Any]:
        return _memory()

    @r.get("/cmd-flags")
    def cmd_flags() -> dict[str, Any]:
        """The flags of this server that A1111 clients look for (the others have no meaning here)."""
        return {
            "api": True,
            "nowebui": True,
            "api_auth": None if settings.api_key is None else "(set)",
            "lora_dir": str(gen.lora_dirs[0]) if gen.lora_dirs else None,
            "controlnet_dir": str(gen.controlnet_dirs[0]) if gen.controlnet_dirs else None,
            "max_size": settings.max_width,
            "max_steps": settings.max_steps,
            "max_images": settings.max_images,
            "max_queue": settings.max_queue,
        }

    @r.get("/scripts")
    def scripts() -> dict[str, list[str]]:
        return {"txt2img": [], "img2img": []}

    @r.get("/embeddings")
    def embeddings() -> dict[str, dict[str, Any]]:
        return {"loaded": {}, "skipped": {}}

    def empty() -> list[Any]:
        return []

    for path in (
        "/sd-vae",
        "/upscalers",
        "/prompt-styles",
        "/hypernetworks",
        "/face-restorers",
        "/script-info",
    ):
        r.add_api_route(path, empty, methods=["GET"], name=path.strip("/"))
    return r
