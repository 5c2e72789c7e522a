"""Images in and out of requests: base64 decoding with a pixel limit read from the header, start images,
control images and the PNGs answers carry.

Every decoding problem answers 422 naming the field; nothing a client sends reaches Pillow's full decode
before its size was checked, so a small file that inflates to gigapixels costs a header read only.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import replace

import torch
from fastapi import HTTPException
from PIL import Image, ImageOps

from eridiffusion.inference.controlnet import ControlUnit
from eridiffusion.inference.generate import GenerateRequest, png_info
from eridiffusion.inference.generator import pil_to_mask, pil_to_pixels


def encode_png(image: Image.Image, parameters: str) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(parameters))
    return base64.b64encode(buf.getvalue()).decode()


def decode_image(data: str, what: str, max_pixels: int) -> Image.Image:
    """A base64 image, with or without a ``data:`` URL prefix; a 422 answer when it is not one or when
    its header declares more than ``max_pixels`` pixels (checked before the pixels are decoded)."""
    if data.startswith("data:"):
        _, comma, data = data.partition(",")
        if not comma:
            raise HTTPException(422, detail=f"{what} is a data: URL without the ',' before its base64 data")
    try:
        raw = base64.b64decode(data, validate=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            if image.width * image.height > max_pixels:
                raise HTTPException(
                    422,
                    detail=f"{what} is {image.width}x{image.height} pixels, above the limit of "
                    f"{max_pixels} pixels",
                )
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own check on opening, for sizes far beyond any sensible limit
        raise HTTPException(422, detail=f"{what} is above the limit of {max_pixels} pixels") from None
    except (binascii.Error, OSError, ValueError) as exc:
        raise HTTPException(422, detail=f"{what} is not a base64 image: {exc}") from None
    return image


def with_start_image(
    req: GenerateRequest,
    init: str | None,
    mask: str | None,
    strength: float,
    max_pixels: int,
    invert: bool = False,
) -> GenerateRequest:
    """Attach img2img / inpaint inputs; the output size defaults to the start image's."""
    if init is None:
        if mask is not None:
            raise HTTPException(422, detail="a mask needs an init image to inpaint")
        return req
    image = decode_image(init, "init image", max_pixels)
    width, height = req.width or image.width, req.height or image.height
    mask_image = None if mask is None else decode_image(mask, "mask", max_pixels)
    return replace(
        req,
        width=width,
        height=height,
        init_image=pil_to_pixels(image, width, height),
        strength=strength,
        mask=None if mask_image is None else pil_to_mask(mask_image, width, height, invert),
    )


def control_pixels(
    data: str, what: str, width: int | None, height: int | None, max_pixels: int, crop: bool = False
) -> torch.Tensor:
    """A base64 control image as (3, H, W) pixels in [-1, 1], at the output size when the request gives
    it (else at its own size; the sampler resizes it to the model's default). ``crop``: scale to cover
    and cut the overflow centred (the extension's "Crop and Resize") instead of stretching."""
    image = decode_image(data, what, max_pixels).convert("RGB")
    if width is None or height is None:
        width, height = image.size
    elif crop:
        image = ImageOps.fit(image, (width, height), Image.BICUBIC)
    return pil_to_pixels(image, width, height)


def checked_unit(unit: ControlUnit, what: str) -> ControlUnit:
    """``unit`` after its own checks (weights, guidance window); a 422 naming it otherwise."""
    try:
        unit.check()
    except ValueError as exc:
        raise HTTPException(422, detail=f"{what}: {exc}") from None
    return unit
