"""Request and response bodies: the native ``/v1`` API and the AUTOMATIC1111 ``/sdapi/v1`` surface.

The A1111 bodies keep A1111's field names and defaults (steps 50, CFG 7, 512x512, seed -1 = random) and
accept the extra fields its clients send (``styles``, ``restore_faces``, ``alwayson_scripts``...), which
have no effect here, so unmodified clients work.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class LoraRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="adapter file path, or its file stem in the server's LoRA folders")
    weight: float = 1.0


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str | list[str]
    negative_prompt: str = ""
    steps: int = Field(25, ge=1)
    cfg_scale: float = 4.0
    sampler: str | None = Field(
        None, description="ddim, euler, dpmpp_2m, 'DPM++ 2M Karras'...; default: the model's"
    )
    seed: int = Field(-1, description="-1: random; image i uses seed + i")
    width: int | None = Field(None, ge=8, description="default: the model's resolution")
    height: int | None = Field(None, ge=8)
    n: int = Field(1, ge=1, description="images per prompt")
    model: str | None = Field(None, description="model name (GET /v1/models); default: the first")
    loras: list[LoraRef] = []
    init_image: str | None = Field(None, description="img2img: base64 start image; size defaults to its own")
    strength: float = Field(0.75, gt=0, le=1, description="img2img: share of the schedule re-run")
    mask: str | None = Field(None, description="inpaint: base64 mask, white = repaint (needs init_image)")


class GenerateResponse(BaseModel):
    id: str
    images: list[str] = Field(description="base64 PNGs with an A1111 'parameters' text chunk")
    seeds: list[int]
    prompts: list[str]
    parameters: list[str]
    model: str
    sampler: str


class JobStatus(BaseModel):
    id: str
    state: str
    progress: float
    step: int
    total_steps: int
    error: str | None = None
    result: GenerateResponse | None = None


class Txt2ImgBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    sampler_name: str | None = None
    sampler_index: str = "Euler"
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int = Field(50, ge=1)
    cfg_scale: float = 7.0
    width: int = Field(512, ge=8)
    height: int = Field(512, ge=8)
    override_settings: dict[str, Any] = {}
    send_images: bool = True


class Img2ImgBody(Txt2ImgBody):
    init_images: list[str] = Field(min_length=1, description="base64 start image (the first is used)")
    denoising_strength: float = Field(0.75, gt=0, le=1)
    mask: str | None = None
    inpainting_mask_invert: int = 0


class ImagesResponse(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str = Field(description="JSON string, as A1111 returns it")


class OptionsBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    sd_model_checkpoint: str | None = None


class PngInfoBody(BaseModel):
    image: str = Field(description="base64 PNG, with or without a data: URL prefix")


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]
