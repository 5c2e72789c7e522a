"""Noise objectives: the forward process a family was trained with and what its denoiser predicts.

The discrete-time DDPM objective (Ho et al. 2020) covers epsilon and v prediction (Salimans & Ho 2022).
The alphas come from diffusers' own scheduler so training and every diffusers sampler agree exactly.
"""

from __future__ import annotations

from typing import Any

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
    ) -> None:
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
        ref = DDPMScheduler(**self._config)
        self.alphas_cumprod = ref.alphas_cumprod.to(torch.float32)

    def scheduler_config(self) -> dict[str, Any]:
        return dict(self._config)

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator)

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[timesteps.cpu()]
        return (a / (1 - a)).to(timesteps.device)

    def make_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> TrainBatchTarget:
        a = self.alphas_cumprod.to(x0.device)[timesteps].view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        sqrt_a, sqrt_1ma = a.sqrt(), (1 - a).sqrt()
        noisy = sqrt_a * x0 + sqrt_1ma * noise
        target = noise if self.prediction_type == "epsilon" else sqrt_a * noise - sqrt_1ma * x0
        return TrainBatchTarget(noisy=noisy, timesteps=timesteps, target=target, snr=self.snr(timesteps))
