"""A1111's inpainting options: mask blur, masked-area fill, "only masked" (full-resolution) inpainting.

These follow the semantics AUTOMATIC1111's img2img documents (our own code, on tensors):

* ``mask_blur_x`` / ``mask_blur_y`` -- a Gaussian blur of the mask (standard deviation in pixels). The
  latent mask is the blurred mask rounded, and the result is pasted over the start image with the blurred
  mask (doubled, so the repainted core stays fully generated), which hides the seam.
* ``fill`` -- what the masked area starts from: ``fill`` (the colours around it, blurred in),
  ``original`` (the start image), ``latent_noise`` (its latents replaced by the seeded noise) or
  ``latent_nothing`` (its latents zeroed). The last two only make sense at high denoising strength.
* ``full_res`` -- "only masked": crop the blurred mask's bounding box plus ``full_res_padding`` pixels
  (widened to the output's aspect ratio), inpaint that crop at the full request size, scale it back and
  paste it with the blurred mask. Small masked areas get every pixel of the model's resolution; every pixel
  outside the mask comes back bit-exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Fill = Literal["fill", "original", "latent_noise", "latent_nothing"]
A1111_FILLS: tuple[Fill, ...] = ("fill", "original", "latent_noise", "latent_nothing")
"""A1111's ``inpainting_fill`` 0..3, in order."""


@dataclass(frozen=True)
class InpaintOptions:
    mask_blur_x: float = 0.0
    mask_blur_y: float = 0.0
    fill: Fill = "original"
    full_res: bool = False
    full_res_padding: int = 0

    def __post_init__(self) -> None:
        if self.mask_blur_x < 0 or self.mask_blur_y < 0 or self.full_res_padding < 0:
            raise ValueError("mask blur and full-res padding must be >= 0")
        if self.fill not in A1111_FILLS:
            raise ValueError(f"inpainting fill must be one of {A1111_FILLS}, got {self.fill!r}")


def _kernel(sigma: float) -> torch.Tensor:
    """A normalised 1-D Gaussian reaching 2.5 sigma each side (A1111 sizes its OpenCV kernel alike)."""
    radius = max(1, int(2.5 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma_x: float, sigma_y: float) -> torch.Tensor:
    """Separable Gaussian blur of (C, H, W); edges replicate, so a mask touching the border stays whole."""
    out = x.float()[None]
    for sigma, dim in ((sigma_x, 3), (sigma_y, 2)):
        if sigma <= 0:
            continue
        k = _kernel(sigma)
        r = k.numel() // 2
        shape = (1, 1, 1, -1) if dim == 3 else (1, 1, -1, 1)
        pad = (r, r, 0, 0) if dim == 3 else (0, 0, r, r)
        channels = out.shape[1]
        weight = k.reshape(shape).expand(channels, 1, *k.reshape(shape).shape[2:]).contiguous()
        out = F.conv2d(F.pad(out, pad, mode="replicate"), weight, groups=channels)
    return out[0]


def blur_mask(mask: torch.Tensor, options: InpaintOptions) -> torch.Tensor:
    return gaussian_blur(mask, options.mask_blur_x, options.mask_blur_y).clamp(0, 1)


def fill_masked(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A1111's "fill": the masked area takes the colours of the unmasked area around it.

    Normalised convolution at falling scales: each masked pixel gets the Gaussian-weighted mean of the
    known pixels, the widest blur first (so every pixel gets a colour), finer ones refining near the
    edge; a fully masked image gets mid grey."""
    known = (1 - mask).clamp(0, 1)
    if known.sum() == 0:
        return image * 0
    estimate = (image * known).sum((1, 2), keepdim=True) / known.sum()
    estimate = estimate.expand_as(image).clone()
    side = max(image.shape[1:])
    sigma = float(side)
    while sigma >= 1:
        num = gaussian_blur(image * known, sigma, sigma)
        den = gaussian_blur(known, sigma, sigma)
        ok = den > 1e-3
        estimate = torch.where(ok, num / den.clamp_min(1e-3), estimate)
        sigma /= 2
    return image * known + estimate * mask


def crop_box(mask: torch.Tensor, padding: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """(x1, y1, x2, y2) around the mask's nonzero pixels plus ``padding``, widened to the aspect ratio
    ``width:height`` where the image allows, clamped to the image; None for an empty mask."""
    _, h, w = mask.shape
    ys, xs = torch.nonzero(mask[0] > 0, as_tuple=True)
    if ys.numel() == 0:
        return None
    x1, x2 = max(0, int(xs.min()) - padding), min(w, int(xs.max()) + 1 + padding)
    y1, y2 = max(0, int(ys.min()) - padding), min(h, int(ys.max()) + 1 + padding)
    box_w, box_h = x2 - x1, y2 - y1
    target = width / height
    if box_w / box_h < target:
        x1, x2 = _widen(x1, x2, min(w, math.ceil(box_h * target)), w)
    else:
        y1, y2 = _widen(y1, y2, min(h, math.ceil(box_w / target)), h)
    return x1, y1, x2, y2


def _widen(lo: int, hi: int, size: int, limit: int) -> tuple[int, int]:
    """Grow [lo, hi) to ``size`` around its centre, shifted back inside [0, limit)."""
    grow = size - (hi - lo)
    lo -= grow // 2
    hi += grow - grow // 2
    if lo < 0:
        lo, hi = 0, hi - lo
    if hi > limit:
        lo, hi = lo - (hi - limit), limit
    return max(0, lo), hi


def resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(C, H, W) to another size: antialiased bilinear (a downscaled crop must not alias)."""
    return F.interpolate(x[None].float(), size=(height, width), mode="bilinear", antialias=True)[0]


@dataclass
class InpaintPlan:
    """What :func:`prepare` hands the sampler, and what :meth:`paste` needs to put its result back."""

    init_image: torch.Tensor
    """The start image the sampler sees: the crop (full-res) and fill applied, at the request size."""
    mask: torch.Tensor
    """The mask the sampler sees (blurred, cropped); the sampler rounds it at latent resolution."""
    original: torch.Tensor
    overlay: torch.Tensor
    """Where the result replaces the original: 1 generated, 0 the original pixel exactly."""
    box: tuple[int, int, int, int] | None

    def paste(self, pixels: torch.Tensor) -> torch.Tensor:
        """Generated (N, 3, H, W) back over the original, through the crop box and the overlay."""
        if self.box is not None:
            x1, y1, x2, y2 = self.box
            canvas = self.original.expand(pixels.shape[0], -1, -1, -1).clone()
            patch = F.interpolate(pixels.float(), size=(y2 - y1, x2 - x1), mode="bilinear", antialias=True)
            canvas[:, :, y1:y2, x1:x2] = patch
            pixels = canvas
        alpha = self.overlay[None]
        return torch.where(alpha > 0, self.original * (1 - alpha) + pixels * alpha, self.original)


def prepare(image: torch.Tensor, mask: torch.Tensor, options: InpaintOptions) -> InpaintPlan:
    """Blur, crop (full-res) and fill: ``image`` (3, H, W) in [-1, 1], ``mask`` (1, H, W), 1 = repaint."""
    _, height, width = image.shape
    blurred = blur_mask(mask, options)
    box = crop_box(blurred, options.full_res_padding, width, height) if options.full_res else None
    if box is None:
        work_image, work_mask = image, blurred
        overlay = (blurred * 2).clamp(0, 1)
    else:
        x1, y1, x2, y2 = box
        work_image = resize(image[:, y1:y2, x1:x2], height, width)
        work_mask = resize(blurred[:, y1:y2, x1:x2], height, width).clamp(0, 1)
        overlay = torch.zeros_like(blurred)
        overlay[:, y1:y2, x1:x2] = blurred[:, y1:y2, x1:x2]
    if options.fill == "fill":
        work_image = fill_masked(work_image, work_mask)
    return InpaintPlan(work_image, work_mask, image, overlay, box)


def fill_latents(
    x0: torch.Tensor, noise: torch.Tensor, keep: torch.Tensor, options: InpaintOptions | None
) -> torch.Tensor:
    """The latent fills: the masked latents (``keep`` = 0) become the seeded noise or zeros before the
    start image is noised; the kept latents are untouched."""
    if options is not None and options.fill == "latent_noise":
        return x0 * keep + noise * (1 - keep)
    if options is not None and options.fill == "latent_nothing":
        return x0 * keep
    return x0
