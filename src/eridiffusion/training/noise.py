"""Noise shaping options of the diffusion loss, as kohya's sd-scripts names them.

- ``noise_offset`` (Guttenberg, "Diffusion with offset noise", 2023): adds a per-image, per-channel constant
  to the noise, so the model also learns to move an image's mean brightness (very dark or bright images).
- ``multires_noise_iterations`` / ``multires_noise_discount`` (Whitaker, "Multi-resolution noise", 2023):
  adds upsampled coarser noise, discounted per level, then renormalises to unit variance.
- ``ip_noise_gamma`` (Ning et al., "Input perturbation reduces exposure bias in diffusion models", 2023):
  the model input is noised with ``noise + gamma * z`` while the target keeps ``noise``.

Every draw is made for the whole micro-batch from the step's generator and cut to this process's rows, so
the options keep multi-process runs and resumes exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from eridiffusion.config.schema import TrainConfig


def _draw(shape: tuple[int, ...], gen: torch.Generator, rows: slice, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=gen)[rows].to(like.device, like.dtype)


def shape_noise(
    noise: torch.Tensor, n_all: int, rows: slice, gen: torch.Generator, t: TrainConfig
) -> torch.Tensor:
    """``noise`` (this process's rows) with the offset and multi-resolution terms the config asks for."""
    c, h, w = noise.shape[1:]
    if t.noise_offset:
        noise = noise + t.noise_offset * _draw((n_all, c, 1, 1), gen, rows, noise)
    if t.multires_noise_iterations:
        for i in range(1, t.multires_noise_iterations + 1):
            r = 2**i
            if h // r < 1 or w // r < 1:
                break
            coarse = _draw((n_all, c, max(1, h // r), max(1, w // r)), gen, rows, noise)
            noise = noise + F.interpolate(coarse, size=(h, w), mode="bilinear") * t.multires_noise_discount**i
        noise = noise / noise.std(dim=(1, 2, 3), keepdim=True)
    return noise


def perturbed(
    noise: torch.Tensor, n_all: int, rows: slice, gen: torch.Generator, t: TrainConfig
) -> torch.Tensor:
    """The noise that makes the model's input under ``ip_noise_gamma`` (the target keeps ``noise``)."""
    if not t.ip_noise_gamma:
        return noise
    return noise + t.ip_noise_gamma * _draw((n_all, *noise.shape[1:]), gen, rows, noise)
