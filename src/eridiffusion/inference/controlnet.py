"""ControlNet units of a generation request and their residuals during sampling.

A unit is what A1111's ControlNet extension calls one: a ControlNet, its control image, a weight and a
guidance window. :class:`Control` prepares the units of one :func:`~eridiffusion.inference.generate.sample`
call once (image at the output size, on the device) and, at each step, sums the residuals of the units
whose window holds that step. The family computes and consumes the residuals
(:class:`~eridiffusion.models.protocol.ControlNetSupport`), so nothing here knows the denoiser.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from eridiffusion.models.protocol import Conditioning, ControlNetSupport, ModelFamily


@dataclass
class ControlUnit:
    """One ControlNet applied to a generation."""

    model: str
    """ControlNet path, or its name in the server's ControlNet folders."""
    image: torch.Tensor
    """The control image (an edge map, depth map, pose...), already preprocessed: pixels in [-1, 1] of
    shape (3, H, W), like ``GenerateRequest.init_image``; resized to the output size when it differs."""
    scale: float = 1.0
    """Multiplies every residual (A1111's "Control Weight", diffusers' ``controlnet_conditioning_scale``)."""
    guidance_start: float = 0.0
    """Fraction of the schedule before which the unit is off."""
    guidance_end: float = 1.0
    """Fraction of the schedule after which the unit is off."""

    def check(self) -> None:
        if self.image.dim() != 3 or self.image.shape[0] != 3:
            raise ValueError(f"control image must be (3, H, W) pixels, got shape {tuple(self.image.shape)}")
        if not 0.0 <= self.guidance_start <= self.guidance_end <= 1.0:
            raise ValueError(
                "ControlNet guidance window must satisfy 0 <= start <= end <= 1, got "
                f"start {self.guidance_start} end {self.guidance_end}"
            )

    def cropped(self, box: tuple[int, int, int, int], size: tuple[int, int]) -> ControlUnit:
        """This unit for an "only masked" inpainting crop: the image at the full output ``size`` (h, w), cut
        to ``box`` (x1, y1, x2, y2) as the start image is, so the control still lines up with it."""
        x1, y1, x2, y2 = box
        return replace(self, image=_resized(self.image.float(), size)[:, y1:y2, x1:x2])

    def infotext(self, index: int) -> str:
        """The ``ControlNet N: "..."`` field A1111's extension writes into the PNG parameters (quoted,
        since its values hold commas)."""
        name = Path(self.model).name.removesuffix(".safetensors")
        return (
            f'ControlNet {index}: "Module: none, Model: {name}, Weight: {self.scale:g}, '
            f'Guidance Start: {self.guidance_start:g}, Guidance End: {self.guidance_end:g}"'
        )

    def key(self) -> tuple[object, ...]:
        """Equal for units that give the same residuals: the batching key of a server job. The image
        enters as a digest of its values, so equal images sent twice still share a batch."""
        digest = hashlib.sha1(self.image.detach().float().cpu().numpy().tobytes()).hexdigest()
        return (self.model, self.scale, self.guidance_start, self.guidance_end, digest)


def require_controlnet_support(family: ModelFamily) -> ControlNetSupport:
    """``family`` as a ControlNet-capable model, or a ValueError naming the families that are."""
    if not isinstance(family, ControlNetSupport):
        raise ValueError(
            f"{family.arch} has no ControlNet support (ControlNets work with sd15, sdxl, sd3 and flux)"
        )
    return family


def control_active(step: int, total: int, start: float, end: float) -> bool:
    """Whether step ``step`` of ``total`` lies in the window [start, end] of the schedule: the step's own
    span [step/total, (step+1)/total] must lie inside it, as diffusers' ``control_guidance_start/end``
    count (so start = end applies no step)."""
    return step / total >= start and (step + 1) / total <= end


class Control:
    """The ControlNet units of one sampling run, ready to give residuals step by step."""

    def __init__(
        self,
        family: ModelFamily,
        units: list[ControlUnit],
        controlnets: Mapping[str, nn.Module],
        size: tuple[int, int],
        device: torch.device,
    ) -> None:
        self.family = require_controlnet_support(family)
        self.units = units
        self.nets: list[nn.Module] = []
        self.images: list[torch.Tensor] = []
        for unit in units:
            unit.check()
            if unit.model not in controlnets:
                raise ValueError(f"ControlNet {unit.model!r} was not loaded for this run")
            net = controlnets[unit.model]
            pixels = _resized(unit.image.float(), size).to(device)
            self.nets.append(net)
            self.images.append(self.family.prepare_control_image(net, pixels[None]))

    def residuals(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning, step: int, total: int
    ) -> Conditioning:
        """The summed residuals of the units active at ``step`` (several ControlNets add up, as in
        diffusers' ``MultiControlNetModel``); empty when none is."""
        out: Conditioning = {}
        for unit, net, image in zip(self.units, self.nets, self.images, strict=True):
            if not control_active(step, total, unit.guidance_start, unit.guidance_end):
                continue
            batch = image.expand(noisy.shape[0], *image.shape[1:])
            res = self.family.control_residuals(net, noisy, timesteps, cond, batch, unit.scale)
            out = {k: out[k] + v for k, v in res.items()} if out else res
        return out


def _resized(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The control image at the output size; the CLI and server resize in PIL first, so this only runs
    for tensors given directly at another size."""
    if tuple(image.shape[1:]) == size:
        return image
    return torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", antialias=True)[0]
