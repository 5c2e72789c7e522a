"""The flow-matching objective agrees with diffusers' FlowMatchEulerDiscreteScheduler and SD3 training
utilities: forward process, shifts (SD3's fixed shift, Flux's resolution-dependent mu), timestep densities,
loss weightings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from eridiffusion.models.objectives import FlowMatchObjective, flux_mu, shift_sigmas
from eridiffusion.models.protocol import NoiseObjective
from eridiffusion.training.losses import min_snr_weights


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 16, 6, 6, generator=g), torch.randn(4, 16, 6, 6, generator=g)


def test_is_a_noise_objective_and_targets_follow_rectified_flow() -> None:
    obj = FlowMatchObjective()
    assert isinstance(obj, NoiseObjective) and obj.prediction_type == "flow"
    x0, noise = batch()
    t = torch.tensor([0.0, 250.0, 500.0, 1000.0])
    out = obj.make_target(x0, noise, t)
    sigma = (t / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(out.noisy, (1 - sigma) * x0 + sigma * noise)
    torch.testing.assert_close(out.target, noise - x0)
    torch.testing.assert_close(out.noisy[0], x0[0])  # sigma 0: clean image
    torch.testing.assert_close(out.noisy[3], noise[3])  # sigma 1: pure noise
    assert torch.equal(out.timesteps, t) and out.weight is None
    assert out.snr[1].item() == pytest.approx(9.0)  # ((1 - 0.25) / 0.25)^2
    assert out.snr[2].item() == pytest.approx(1.0) and out.snr[3].item() == 0.0
    assert math.isfinite(out.snr[0].item())


def test_forward_process_matches_diffusers_scale_noise() -> None:
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    x0, noise = batch()
    t = sched.timesteps[[0, 3, 6, 9]]
    ours = FlowMatchObjective(shift=3.0).make_target(x0, noise, t).noisy
    torch.testing.assert_close(ours, sched.scale_noise(x0, t, noise))


def test_sd3_shift_matches_the_scheduler_and_moves_sigmas_up() -> None:
    u = np.linspace(0.95, 0.05, 7)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=u.tolist())
    torch.testing.assert_close(sched.sigmas[:-1], shift_sigmas(torch.tensor(u, dtype=torch.float32), 3.0))
    assert shift_sigmas(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)
    assert shift_sigmas(torch.tensor(0.5), 1.0).item() == 0.5


@pytest.mark.parametrize("seq_len", [256, 1024, 4096])
def test_flux_dynamic_shift_matches_the_scheduler(seq_len: int) -> None:
    mu = flux_mu(seq_len)
    assert mu == pytest.approx(calculate_shift(seq_len, 256, 4096, 0.5, 1.15))
    u = np.linspace(1.0, 0.25, 4)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched.set_timesteps(sigmas=u.tolist(), mu=mu)
    torch.testing.assert_close(
        sched.sigmas[:-1], shift_sigmas(torch.tensor(u, dtype=torch.float32), math.exp(mu))
    )


def test_flux_shift_follows_the_batch_resolution() -> None:
    """Latent (16, 32, 32) = 256 px = 256 tokens -> mu 0.5; (16, 128, 128) = 1024 px = 4096 -> 1.15."""
    obj = FlowMatchObjective(dynamic_shift=True, default_image_seq_len=1024)
    assert obj.image_seq_len((16, 64, 64)) == 1024 and obj.image_seq_len(None) == 1024
    assert obj.effective_shift((16, 32, 32)) == pytest.approx(math.exp(0.5))
    assert obj.effective_shift((16, 128, 128)) == pytest.approx(math.exp(1.15))
    small = obj.sample_timesteps(4000, torch.Generator().manual_seed(0), latent_shape=(16, 32, 32))
    large = obj.sample_timesteps(4000, torch.Generator().manual_seed(0), latent_shape=(16, 128, 128))
    assert bool((large > small).all())  # same u, larger shift: every timestep noisier
    assert obj.set_timesteps_kwargs(4, (16, 32, 32)) == {"mu": pytest.approx(0.5)}
    fixed = FlowMatchObjective(shift=3.0, full_range_sigmas=True)
    assert fixed.set_timesteps_kwargs(4, (16, 64, 64)) == {"sigmas": [1.0, 0.75, 0.5, 0.25]}


def test_logit_normal_sampling_statistics_and_seeding() -> None:
    """Esser et al. 2024, eq. 19: logit(t) ~ N(m, s); with shift 1 the timesteps are sigma * 1000."""
    obj = FlowMatchObjective("logit_normal", logit_mean=0.5, logit_std=0.8)
    t = obj.sample_timesteps(20000, torch.Generator().manual_seed(1))
    assert torch.equal(t, obj.sample_timesteps(20000, torch.Generator().manual_seed(1)))
    assert t.dtype == torch.float32 and t.min() > 0 and t.max() < 1000
    logits = torch.logit(t / 1000)
    assert logits.mean().item() == pytest.approx(0.5, abs=0.03)
    assert logits.std().item() == pytest.approx(0.8, abs=0.03)
    uniform = FlowMatchObjective("uniform").sample_timesteps(20000, torch.Generator().manual_seed(1))
    assert (uniform / 1000).mean().item() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform"])
def test_densities_match_diffusers_sd3_training_utils(scheme: str) -> None:
    obj = FlowMatchObjective(scheme, logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
    ours = obj.sample_u(64, torch.Generator().manual_seed(7))
    theirs = compute_density_for_timestep_sampling(
        scheme, 64, logit_mean=0.3, logit_std=1.2, mode_scale=1.29, generator=torch.Generator().manual_seed(7)
    )
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap"])
def test_loss_weightings_match_diffusers(scheme: str) -> None:
    obj = FlowMatchObjective(loss_weighting=scheme)
    t = torch.tensor([100.0, 400.0, 900.0])
    x0, noise = torch.zeros(3, 2), torch.ones(3, 2)
    weight = obj.make_target(x0, noise, t).weight
    torch.testing.assert_close(weight, compute_loss_weighting_for_sd3(scheme, t / 1000).float())


def test_bad_settings_and_min_snr_are_refused() -> None:
    with pytest.raises(ValueError, match="timestep_sampling must be one of"):
        FlowMatchObjective("sigmoid")
    with pytest.raises(ValueError, match="loss_weighting must be one of"):
        FlowMatchObjective(loss_weighting="snr")
    with pytest.raises(ValueError, match="shift and logit_std must be positive"):
        FlowMatchObjective(shift=0.0)
    with pytest.raises(ValueError, match="train.min_snr_gamma: .* not 'flow'"):
        min_snr_weights(torch.ones(2), 5.0, "flow")
