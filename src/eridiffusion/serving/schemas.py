"""Request and response bodies: the native ``/v1`` API and the AUTOMATIC1111 ``/sdapi/v1`` surface.

The A1111 bodies keep A1111's field names and defaults (steps 50, CFG 7, 512x512, seed -1 = random) and
accept the extra fields its clients send (``styles``, ``restore_faces``...), which have no effect here,
so unmodified clients work; of ``alwayson_scripts`` only the ControlNet extension's units are honoured.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class LoraRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="adapter file path, or its file stem in the server's LoRA folders")
    weight: float = 1.0


class ControlNetRef(BaseModel):
    """One ControlNet unit of a native request."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="ControlNet name (GET /controlnet/model_list) or path on the server")
    image: str = Field(description="base64 control image, already preprocessed (edges, depth, pose...)")
    scale: float = Field(1.0, description="conditioning scale (A1111's control weight)")
    guidance_start: float = Field(0.0, ge=0, le=1, description="share of the schedule before it applies")
    guidance_end: float = Field(1.0, ge=0, le=1, description="share of the schedule after which it stops")


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
    controlnet: ControlNetRef | list[ControlNetRef] | None = Field(
        None, description="ControlNet unit(s); several add their residuals"
    )


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
    alwayson_scripts: dict[str, Any] = Field(
        {}, description="extension arguments; 'controlnet' (sd-webui-controlnet's format) is honoured"
    )
    send_images: bool = True


class Img2ImgBody(Txt2ImgBody):
    init_images: list[str] = Field(min_length=1, description="base64 start image (the first is used)")
    denoising_strength: float = Field(0.75, gt=0, le=1)
    mask: str | None = None
    inpainting_mask_invert: int = Field(0, ge=0, le=1, description="1: black repaints, white is kept")
    mask_blur: int | None = Field(None, ge=0, description="sets both mask_blur_x and mask_blur_y")
    mask_blur_x: int = Field(4, ge=0, description="Gaussian blur of the mask (pixels)")
    mask_blur_y: int = Field(4, ge=0)
    inpainting_fill: int = Field(
        0, ge=0, le=3, description="masked area starts: 0 fill, 1 original, 2 latent noise, 3 latent nothing"
    )
    inpaint_full_res: bool = Field(True, description="only masked: inpaint the mask's box at full size")
    inpaint_full_res_padding: int = Field(0, ge=0, description="pixels added around the mask's box")


class ImagesResponse(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str = Field(description="JSON string, as A1111 returns it")


class OptionsBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    sd_model_checkpoint: str | None = None
    live_previews_enable: bool | None = Field(None, description="current_image in /progress (off by default)")
    show_progress_every_n_steps: int | None = Field(None, ge=1, description="live preview every N steps")


class PngInfoBody(BaseModel):
    image: str = Field(description="base64 PNG, with or without a data: URL prefix")


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]
