"""Noise objectives: the forward process a family was trained with and what its denoiser predicts.

The discrete-time DDPM objective (Ho et al. 2020) covers epsilon and v prediction (Salimans & Ho 2022).
The alphas come from diffusers' own scheduler so training and every diffusers sampler agree exactly.
The flow-matching objective (rectified flow; Liu et al. 2022, Lipman et al. 2022) is the one SD3 and Flux
were trained with, with the timestep densities and shifts of Esser et al. 2024 ("Scaling Rectified Flow
Transformers for High-Resolution Image Synthesis").
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler

from eridiffusion.models.protocol import TrainBatchTarget

BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2", "quadratic": "scaled_linear"}
"""Our names -> diffusers' (``scaled_linear`` is linear in sqrt(beta), i.e. quadratic in beta)."""


class DDPMObjective:
    """Epsilon or v prediction over ``num_train_timesteps`` discrete steps."""

    def __init__(
        self,
        beta_schedule: str = "linear",
        prediction_type: str = "epsilon",
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        timestep_spacing: str | None = None,
        steps_offset: int | None = None,
    ) -> None:
        """``timestep_spacing`` / ``steps_offset``: the model's inference convention (SD's is "leading"
        with offset 1), part of :meth:`scheduler_config`, so every sampler and the scheduler written into
        a saved folder follow it; None leaves each diffusers scheduler's own default (the tiny family)."""
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {sorted(BETA_SCHEDULES)}, got {beta_schedule!r}")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be epsilon or v_prediction, got {prediction_type!r}")
        self.beta_schedule = beta_schedule
        self.prediction_type = prediction_type
        self.num_train_timesteps = num_train_timesteps
        self._config: dict[str, Any] = {
            "num_train_timesteps": num_train_timesteps,
            "beta_schedule": BETA_SCHEDULES[beta_schedule],
            "beta_start": beta_start,
            "beta_end": beta_end,
            "prediction_type": prediction_type,
        }
        if timestep_spacing is not None:
            self._config["timestep_spacing"] = timestep_spacing
        if steps_offset is not None:
            self._config["steps_offset"] = steps_offset
        ref = DDPMScheduler(**self._config)
        self.alphas_cumprod = ref.alphas_cumprod.to(torch.float32)

    def scheduler_config(self) -> dict[str, Any]:
        """The one scheduler config: betas, prediction type and inference spacing. Samplers are built
        from it and ``save_pretrained`` writes it, so our images equal diffusers' pipeline on our folders."""
        return dict(self._config)

    def sample_timesteps(
        self, n: int, generator: torch.Generator, latent_shape: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator)

    def fixed_timesteps(self, n: int, latent_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """``n`` timesteps at the evenly spaced quantiles (i + 0.5) / n of the (uniform) training density:
        the same every call, spread over the schedule as training draws them (validation loss)."""
        q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        return (q * self.num_train_timesteps).long().clamp_(0, self.num_train_timesteps - 1)

    def set_timesteps_kwargs(self, steps: int, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        return {}

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[timesteps.cpu()]
        return (a / (1 - a)).to(timesteps.device)

    def make_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> TrainBatchTarget:
        a = self.alphas_cumprod.to(x0.device)[timesteps].view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        sqrt_a, sqrt_1ma = a.sqrt(), (1 - a).sqrt()
        noisy = sqrt_a * x0 + sqrt_1ma * noise
        target = noise if self.prediction_type == "epsilon" else sqrt_a * noise - sqrt_1ma * x0
        return TrainBatchTarget(noisy=noisy, timesteps=timesteps, target=target, snr=self.snr(timesteps))


TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode")
"""Densities over t in (0, 1) from Esser et al. 2024, section 3.1 (logit-normal; mode, with heavy tails)."""

LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
"""Per-sample loss weights of diffusers' SD3 trainer: none, sigma^-2, the cosine map (Esser et al. 2024)."""


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Esser et al. 2024, eq. 23: sigma' = s * sigma / (1 + (s - 1) * sigma), which moves the same density
    towards more noise for larger images (s = 3 for SD3 at 1024 px). Flux's exponential time shift with
    ``mu`` is this map with s = exp(mu)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flux_mu(
    image_seq_len: int,
    base_image_seq_len: int = 256,
    max_image_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Flux's resolution-dependent log-shift: linear in the number of image tokens, from ``base_shift`` at
    256 tokens (256 px) to ``max_shift`` at 4096 tokens (1024 px), as diffusers' ``calculate_shift``."""
    slope = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    return image_seq_len * slope + base_shift - slope * base_image_seq_len


class FlowMatchObjective:
    """Rectified flow: x_t = (1 - sigma) x0 + sigma * noise and the denoiser predicts the velocity
    noise - x0 (Liu et al. 2022, "Flow Straight and Fast"; Esser et al. 2024 for SD3, also Flux).

    Timesteps are ``sigma * num_train_timesteps`` as floats, the convention of diffusers'
    ``FlowMatchEulerDiscreteScheduler``; each family's ``predict`` rescales them for its transformer.
    sigma comes from a density on (0, 1) (``timestep_sampling``) followed by the model's shift: a fixed one
    (``shift``, SD3) or, with ``dynamic_shift``, exp(mu) with mu from the image token count (Flux dev).
    Min-SNR weighting does not apply (it is defined for epsilon/v targets); ``loss_weighting`` offers the
    SD3 paper's weightings instead.
    """

    prediction_type = "flow"

    def __init__(
        self,
        timestep_sampling: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        shift: float = 1.0,
        dynamic_shift: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        loss_weighting: str = "none",
        patch_size: int = 2,
        default_image_seq_len: int = 4096,
        full_range_sigmas: bool = False,
        num_train_timesteps: int = 1000,
    ) -> None:
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(
                f"timestep_sampling must be one of {list(TIMESTEP_SAMPLING)}, got {timestep_sampling!r}"
            )
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {list(LOSS_WEIGHTINGS)}, got {loss_weighting!r}")
        if shift <= 0 or logit_std <= 0:
            raise ValueError(f"shift and logit_std must be positive, got {shift=}, {logit_std=}")
        self.timestep_sampling = timestep_sampling
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.shift, self.dynamic_shift = shift, dynamic_shift
        self.base_shift, self.max_shift = base_shift, max_shift
        self.base_image_seq_len, self.max_image_seq_len = base_image_seq_len, max_image_seq_len
        self.loss_weighting = loss_weighting
        self.patch_size = patch_size
        self.default_image_seq_len = default_image_seq_len
        self.full_range_sigmas = full_range_sigmas
        self.num_train_timesteps = num_train_timesteps

    def scheduler_config(self) -> dict[str, Any]:
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "shift": self.shift,
            "use_dynamic_shifting": self.dynamic_shift,
            "base_shift": self.base_shift,
            "max_shift": self.max_shift,
            "base_image_seq_len": self.base_image_seq_len,
            "max_image_seq_len": self.max_image_seq_len,
        }

    def image_seq_len(self, latent_shape: tuple[int, ...] | None) -> int:
        """Transformer tokens of one image: (H / patch) x (W / patch) for a (C, H, W) latent."""
        if latent_shape is None:
            return self.default_image_seq_len
        height, width = latent_shape[-2:]
        return (height // self.patch_size) * (width // self.patch_size)

    def mu(self, latent_shape: tuple[int, ...] | None) -> float:
        return flux_mu(
            self.image_seq_len(latent_shape),
            self.base_image_seq_len,
            self.max_image_seq_len,
            self.base_shift,
            self.max_shift,
        )

    def effective_shift(self, latent_shape: tuple[int, ...] | None = None) -> float:
        """The shift s of eq. 23 for this latent size: fixed, or exp(mu) with dynamic shifting."""
        return math.exp(self.mu(latent_shape)) if self.dynamic_shift else self.shift

    def sample_u(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Unshifted t in (0, 1) from the configured density (Esser et al. 2024, eqs. 19 and 20)."""
        if self.timestep_sampling == "logit_normal":
            z = torch.randn(n, generator=generator) * self.logit_std + self.logit_mean
            return torch.sigmoid(z)
        u = torch.rand(n, generator=generator)
        if self.timestep_sampling == "mode":
            u = 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return u

    def sample_timesteps(
        self, n: int, generator: torch.Generator, latent_shape: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        sigmas = shift_sigmas(self.sample_u(n, generator), self.effective_shift(latent_shape))
        return sigmas * self.num_train_timesteps

    def fixed_timesteps(self, n: int, latent_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """``n`` timesteps at the evenly spaced quantiles (i + 0.5) / n of the configured density, shifted as
        in training: the same every call, so a validation loss compares across steps."""
        q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        if self.timestep_sampling == "logit_normal":
            u = torch.sigmoid(torch.special.ndtri(q) * self.logit_std + self.logit_mean)
        elif self.timestep_sampling == "mode":  # a map of a uniform draw: the map of its quantiles
            u = 1 - q - self.mode_scale * (torch.cos(math.pi * q / 2) ** 2 - 1 + q)
            u = u.sort().values
        else:
            u = q
        sigmas = shift_sigmas(u.float(), self.effective_shift(latent_shape))
        return sigmas * self.num_train_timesteps

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps.float() / self.num_train_timesteps

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio of x_t: ((1 - sigma) / sigma)^2 (infinite at sigma = 0, clamped)."""
        sigma = self.sigmas(timesteps).clamp_min(1e-12)
        return ((1 - sigma) / sigma) ** 2

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """None for ``none``; sigma^-2 (sigma clamped at 1e-4 so sigma = 0 stays finite) or the cosmap
        weight 2 / (pi * (1 - 2 sigma + 2 sigma^2))."""
        if self.loss_weighting == "none":
            return None
        sigma = self.sigmas(timesteps)
        if self.loss_weighting == "sigma_sqrt":
            return sigma.clamp_min(1e-4) ** -2
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))

    def make_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> TrainBatchTarget:
        sigma = self.sigmas(timesteps).to(x0.device, x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        noisy = (1 - sigma) * x0 + sigma * noise
        return TrainBatchTarget(
            noisy=noisy,
            timesteps=timesteps,
            target=noise - x0,
            snr=self.snr(timesteps),
            weight=self.loss_weights(timesteps),
        )

    def set_timesteps_kwargs(self, steps: int, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        """``mu`` for dynamic shifting; with ``full_range_sigmas`` the sigmas linspace(1, 1/N, N) that BFL's
        and diffusers' Flux pipelines pass instead of the scheduler's default linspace(1, 1/1000, N)."""
        kwargs: dict[str, Any] = {}
        if self.dynamic_shift:
            kwargs["mu"] = self.mu(latent_shape)
        if self.full_range_sigmas:
            kwargs["sigmas"] = np.linspace(1.0, 1.0 / steps, steps).tolist()
        return kwargs
