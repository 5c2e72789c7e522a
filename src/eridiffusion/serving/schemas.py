"""Request and response bodies: the native ``/v1`` API and the AUTOMATIC1111 ``/sdapi/v1`` surface.

The A1111 bodies keep A1111's field names and defaults (steps 50, CFG 7, seed -1 = random) and accept
the extra fields its clients send, so unmodified clients work; of ``alwayson_scripts`` only the ControlNet
extension's units are honoured.

Every request body refuses NaN / Infinity numbers and lone UTF-16 surrogates anywhere in it (JSON allows
both; neither survives a tokenizer, a PNG text chunk or a JSON answer), so they end as a 422 naming the
field instead of a failure halfway through a generation.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_SIDE = 16384
"""Schema bound on width and height, far above any server's limit (``--max-size``): it keeps absurd
numbers away from arithmetic before the limit check names the configured size."""
MAX_COUNT = 1000
"""Schema bound on steps and image counts, for the same reason (``--max-steps``, ``--max-images``)."""
MAX_CFG = 100.0
"""Schema bound on CFG scales (A1111's UI stops at 30): far beyond it the guided prediction overflows to
inf, which would only show after the whole generation ran."""
MAX_CONTROL_WEIGHT = 10.0
"""Schema bound on ControlNet weights (A1111's UI stops at 2), for the same reason."""
MAX_SEED = 2**63 - 1024
"""Seeds above this would overflow torch's generator once image i adds i."""


def _bad_value(value: Any, where: str) -> str | None:
    """Where in ``value`` (a parsed JSON document) a non-finite number or a lone surrogate sits."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where or 'body'}: {value} is not a finite number"
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{where or 'body'}: text holds a lone UTF-16 surrogate (not valid Unicode)"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and _bad_value(key, where) is not None:
            return f"{where or 'body'}: a key holds a lone UTF-16 surrogate (not valid Unicode)"
        found = _bad_value(item, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


class Body(BaseModel):
    """Base of every request body: finite numbers and valid Unicode only, checked before any field."""

    model_config = ConfigDict(allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _finite_and_unicode(cls, data: Any) -> Any:
        problem = _bad_value(data, "")
        if problem is not None:
            raise ValueError(problem)
        return data


class LoraRef(Body):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str = Field(
        description="LoRA name: a file stem in the server's LoRA folders, or a path relative to one"
    )
    weight: float = 1.0


class ControlNetRef(Body):
    """One ControlNet unit of a native request."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str = Field(description="ControlNet name (GET /controlnet/model_list) in the server's folders")
    image: str = Field(description="base64 control image, already preprocessed (edges, depth, pose...)")
    scale: float = Field(
        1.0, ge=-MAX_CONTROL_WEIGHT, le=MAX_CONTROL_WEIGHT, description="conditioning scale (A1111's weight)"
    )
    guidance_start: float = Field(0.0, ge=0, le=1, description="share of the schedule before it applies")
    guidance_end: float = Field(1.0, ge=0, le=1, description="share of the schedule after which it stops")


class GenerateBody(Body):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    prompt: str | list[str]
    negative_prompt: str = ""
    steps: int = Field(25, ge=1, le=MAX_COUNT)
    cfg_scale: float = Field(4.0, ge=-MAX_CFG, le=MAX_CFG)
    sampler: str | None = Field(
        None, description="ddim, euler, dpmpp_2m, 'DPM++ 2M Karras'...; default: the model's"
    )
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1: random; image i uses seed + i")
    width: int | None = Field(None, ge=8, le=MAX_SIDE, description="default: the model's resolution")
    height: int | None = Field(None, ge=8, le=MAX_SIDE)
    n: int = Field(1, ge=1, le=MAX_COUNT, description="images per prompt")
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


class Txt2ImgBody(Body):
    """A1111's txt2img request. As in A1111 (whose request models make every field Optional), JSON
    ``null`` means "the default" for every field. Unknown fields are accepted but never echoed back."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Field(-1, le=MAX_SEED, description="negative: random; image i uses seed + i")
    sampler_name: str | None = None
    sampler_index: str = "Euler"
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1, le=MAX_COUNT)
    n_iter: int = Field(1, ge=1, le=MAX_COUNT)
    steps: int = Field(50, ge=1, le=MAX_COUNT)
    cfg_scale: float = Field(7.0, ge=-MAX_CFG, le=MAX_CFG)
    width: int | None = Field(None, ge=8, le=MAX_SIDE, description="default: the model's training size")
    height: int | None = Field(None, ge=8, le=MAX_SIDE, description="default: the model's training size")
    override_settings: dict[str, Any] = {}
    alwayson_scripts: dict[str, Any] = Field(
        {}, description="extension arguments; 'controlnet' (sd-webui-controlnet's format) is honoured"
    )
    send_images: bool = True

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data

    def known_fields(self) -> dict[str, Any]:
        """The request's own fields without the extras a client added (A1111's ``parameters`` echo)."""
        return self.model_dump(include=set(type(self).model_fields))


class Img2ImgBody(Txt2ImgBody):
    init_images: list[str] = Field(min_length=1, description="base64 start image (the first is used)")
    denoising_strength: float = Field(0.75, gt=0, le=1)
    mask: str | None = None
    inpainting_mask_invert: int = Field(0, ge=0, le=1, description="1: black repaints, white is kept")
    mask_blur: int | None = Field(None, ge=0, le=64, description="sets both mask_blur_x and mask_blur_y")
    mask_blur_x: int = Field(4, ge=0, le=64, description="Gaussian blur of the mask (pixels, A1111's range)")
    mask_blur_y: int = Field(4, ge=0, le=64)
    inpainting_fill: int = Field(
        0, ge=0, le=3, description="masked area starts: 0 fill, 1 original, 2 latent noise, 3 latent nothing"
    )
    inpaint_full_res: bool = Field(True, description="only masked: inpaint the mask's box at full size")
    inpaint_full_res_padding: int = Field(
        0, ge=0, le=MAX_SIDE, description="pixels added around the mask's box"
    )


class ImagesResponse(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str = Field(description="JSON string, as A1111 returns it")


class OptionsBody(Body):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    sd_model_checkpoint: str | None = None
    live_previews_enable: bool | None = Field(None, description="current_image in /progress (off by default)")
    show_progress_every_n_steps: int | None = Field(None, ge=1, description="live preview every N steps")


class PngInfoBody(Body):
    image: str = Field(description="base64 PNG, with or without a data: URL prefix")


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]
