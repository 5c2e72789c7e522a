"""Autoencoder training objective: reconstruction + KL + an optional patch-GAN adversary.

The recipe of the latent-diffusion autoencoders (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models"): an L1 reconstruction term, a small KL pull towards N(0, I) so latents stay well
scaled, and after a warm-up a PatchGAN discriminator (Isola et al. 2017, "Image-to-Image Translation with
Conditional Adversarial Networks") trained with the hinge loss, whose adversarial term sharpens edges that
pixel losses blur. The discriminator has its own optimizer and starts only after ``disc_start`` steps, when
reconstructions are good enough for its gradients to be useful.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn


class PatchDiscriminator(nn.Module):
    """Classifies overlapping patches as real or reconstructed (one logit per patch)."""

    def __init__(self, channels: int = 32, layers: int = 2, in_channels: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for _ in range(1, layers):
            blocks += [nn.Conv2d(width, width * 2, 4, 2, 1), nn.GroupNorm(8, width * 2), nn.LeakyReLU(0.2)]
            width *= 2
        blocks.append(nn.Conv2d(width, 1, 3, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass(frozen=True)
class AutoencoderLossConfig:
    kl_weight: float = 1e-6
    disc_weight: float = 0.1
    disc_start: int = 0
    """Optimizer steps before the adversarial terms switch on."""
    mse_weight: float = 0.0
    """L1 alone moves every pixel by the same push however wrong it is, so a small object with a wrong colour
    is fixed late; a squared term weights such large errors up."""


def generator_loss(
    vae: AutoencoderKL,
    pixels: torch.Tensor,
    disc: PatchDiscriminator | None,
    step: int,
    cfg: AutoencoderLossConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(loss for the autoencoder, its reconstruction for the discriminator step, scalar metrics as detached
    tensors: the trainer moves them to the host once per step, together)."""
    posterior = vae.encode(pixels).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=generator).to(pixels.device, posterior.mean.dtype)
    latents = posterior.mean + posterior.std * noise
    recon = vae.decode(latents).sample
    rec = F.l1_loss(recon, pixels)
    if cfg.mse_weight:
        rec = rec + cfg.mse_weight * F.mse_loss(recon, pixels)
    kl = posterior.kl().mean() / pixels[0].numel()
    loss = rec + cfg.kl_weight * kl
    metrics = {"rec_loss": rec.detach(), "kl": kl.detach()}
    if disc is not None and step >= cfg.disc_start:
        adv = -disc(recon).mean()
        loss = loss + cfg.disc_weight * adv
        metrics["g_adv"] = adv.detach()
    metrics["loss"] = loss.detach()
    return loss, recon.detach(), metrics


def discriminator_loss(
    disc: PatchDiscriminator, real: torch.Tensor, fake: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Hinge loss (Lim & Ye 2017): push real logits above +1 and fake ones below -1."""
    d_real = disc(real)
    d_fake = disc(fake)
    loss = 0.5 * (F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean())
    metrics = {"d_loss": loss.detach(), "d_real": d_real.mean().detach(), "d_fake": d_fake.mean().detach()}
    return loss, metrics


@torch.no_grad()
def calibration_latents(vae: AutoencoderKL, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Posterior means of several pixel batches, encoded one batch at a time to bound memory."""
    return torch.cat([vae.encode(pixels).latent_dist.mean.float().cpu() for pixels in batches])


def latent_channel_statistics(latents: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std. A learned autoencoder spreads information unevenly (one channel may vary
    5x less than another); standardising each channel gives every one the same signal-to-noise ratio under
    the diffusion schedule, so none is decided only in the last sampling steps."""
    mean = latents.mean(dim=(0, 2, 3))
    std = latents.std(dim=(0, 2, 3)).clamp(min=1e-6)
    return mean.tolist(), std.tolist()


def latent_scaling_factor(latents: torch.Tensor) -> float:
    """1 / std of the latents, as Stable Diffusion set its 0.18215: unit-variance diffusion inputs whatever
    the autoencoder learned."""
    return float(1.0 / latents.float().std().clamp(min=1e-6))
