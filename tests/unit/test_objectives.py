"""The DDPM objective agrees exactly with diffusers' DDPMScheduler, which every sampler is built from."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from eridiffusion.models.objectives import DDPMObjective

SCHEDULES = ["linear", "cosine", "quadratic"]
PREDICTIONS = ["epsilon", "v_prediction"]


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, 5, generator=g)
    noise = torch.randn(4, 3, 5, 5, generator=g)
    return x0, noise, torch.tensor([0, 10, 500, 999])


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("beta_schedule", SCHEDULES)
def test_make_target_matches_diffusers(beta_schedule: str, prediction_type: str) -> None:
    obj = DDPMObjective(beta_schedule, prediction_type)
    ref = DDPMScheduler(**obj.scheduler_config())
    x0, noise, t = batch()

    out = obj.make_target(x0, noise, t)

    torch.testing.assert_close(out.noisy, ref.add_noise(x0, noise, t))
    expected = noise if prediction_type == "epsilon" else ref.get_velocity(x0, noise, t)
    torch.testing.assert_close(out.target, expected)
    assert torch.equal(out.timesteps, t)
    assert out.noisy.shape == out.target.shape == x0.shape
    torch.testing.assert_close(out.snr, ref.alphas_cumprod[t] / (1 - ref.alphas_cumprod[t]))


@pytest.mark.parametrize(
    ("beta_schedule", "diffusers_name"),
    [("linear", "linear"), ("cosine", "squaredcos_cap_v2"), ("quadratic", "scaled_linear")],
)
def test_scheduler_config(beta_schedule: str, diffusers_name: str) -> None:
    obj = DDPMObjective(
        beta_schedule, "v_prediction", num_train_timesteps=500, beta_start=1e-4, beta_end=2e-2
    )
    assert obj.scheduler_config() == {
        "num_train_timesteps": 500,
        "beta_schedule": diffusers_name,
        "beta_start": 1e-4,
        "beta_end": 2e-2,
        "prediction_type": "v_prediction",
    }
    obj.scheduler_config()["prediction_type"] = "epsilon"  # a copy: callers cannot corrupt the objective
    assert obj.scheduler_config()["prediction_type"] == "v_prediction"


def test_betas_by_hand_for_three_steps() -> None:
    bs, be = 0.01, 0.09
    lin = DDPMObjective("linear", num_train_timesteps=3, beta_start=bs, beta_end=be).alphas_cumprod
    torch.testing.assert_close(lin, torch.tensor([0.99, 0.99 * 0.95, 0.99 * 0.95 * 0.91]))
    # quadratic: linear in sqrt(beta): sqrt betas 0.1, 0.2, 0.3
    quad = DDPMObjective("quadratic", num_train_timesteps=3, beta_start=bs, beta_end=be).alphas_cumprod
    torch.testing.assert_close(quad, torch.tensor([0.99, 0.99 * 0.96, 0.99 * 0.96 * 0.91]))


def test_cosine_schedule_follows_nichol_dhariwal() -> None:
    obj = DDPMObjective("cosine", num_train_timesteps=1000)

    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    # alphas_cumprod[i] = abar((i + 1) / T) / abar(0) while no beta is clipped
    assert obj.alphas_cumprod[499].item() == pytest.approx(abar(0.5) / abar(0.0), rel=1e-4)
    assert obj.alphas_cumprod[0].item() == pytest.approx(abar(0.001) / abar(0.0), rel=1e-5)


def test_snr_values() -> None:
    obj = DDPMObjective("linear", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012)
    snr = obj.snr(torch.tensor([0, 999]))
    # about 1175.5; rel 1e-4 because 1 - alpha_bar cancels digits in float32
    assert snr[0].item() == pytest.approx((1 - 0.00085) / 0.00085, rel=1e-4)
    a = obj.alphas_cumprod[999].item()
    assert snr[1].item() == pytest.approx(a / (1 - a), rel=1e-5)
    all_snr = obj.snr(torch.arange(1000))
    assert bool((all_snr[1:] < all_snr[:-1]).all())  # strictly decreasing with t


def test_v_target_is_zero_for_x0_equal_noise_scaled() -> None:
    # v = sqrt(a) * noise - sqrt(1 - a) * x0 vanishes where x0 / noise = sqrt(a) / sqrt(1 - a)
    obj = DDPMObjective("linear", "v_prediction")
    t = torch.tensor([500])
    a = obj.alphas_cumprod[500]
    noise = torch.ones(1, 2)
    x0 = noise * a.sqrt() / (1 - a).sqrt()
    out = obj.make_target(x0, noise, t)
    torch.testing.assert_close(out.target, torch.zeros(1, 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.noisy, noise * (a.sqrt() ** 2 / (1 - a).sqrt() + (1 - a).sqrt()))


def test_sample_timesteps_in_range_and_seeded() -> None:
    obj = DDPMObjective(num_train_timesteps=50)
    t1 = obj.sample_timesteps(200, torch.Generator().manual_seed(3))
    t2 = obj.sample_timesteps(200, torch.Generator().manual_seed(3))
    assert torch.equal(t1, t2)
    assert t1.shape == (200,)
    assert int(t1.min()) >= 0
    assert int(t1.max()) <= 49


def test_bad_beta_schedule() -> None:
    with pytest.raises(ValueError, match=r"beta_schedule must be one of \['cosine', 'linear', 'quadratic'\]"):
        DDPMObjective("sigmoid")


def test_bad_prediction_type() -> None:
    with pytest.raises(ValueError, match="prediction_type must be epsilon or v_prediction, got 'sample'"):
        DDPMObjective("linear", "sample")
