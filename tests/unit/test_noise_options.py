"""noise_offset, multi-resolution noise and input perturbation change what the loss sees as they should
(recorded at the objective's make_target), and leave it alone when off."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from eridiffusion.cli import EXIT_USER_ERROR, main
from eridiffusion.config import validate_config
from eridiffusion.data.loader import TrainingData
from eridiffusion.training.loop import load_or_build
from eridiffusion.training.step import diffusion_loss
from tests.conftest import tiny_job, write_yaml


def _noises(tmp_path: Path, **train: Any) -> list[torch.Tensor]:
    """The noise tensors make_target received for one micro-batch (a second call: the perturbed input)."""
    job = tiny_job(tmp_path)
    job["train"].update(batch_size=8, **train)
    cfg = validate_config(job)
    family = load_or_build(cfg)
    data = TrainingData(cfg.datasets, 8, cfg.train.seed, family.size_multiple())
    seen: list[torch.Tensor] = []
    real = family.objective.make_target

    def record(x0, noise, t):  # noqa: ANN001, ANN202
        seen.append(noise.clone())
        return real(x0, noise, t)

    family.objective.make_target = record  # type: ignore[method-assign]
    diffusion_loss(family, data.batch(0), cfg, torch.Generator().manual_seed(7), torch.device("cpu"))
    return seen


def test_options_off_leave_the_noise_unit_gaussian_and_single(tmp_path: Path) -> None:
    (noise,) = _noises(tmp_path)
    assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1


def test_noise_offset_adds_a_per_channel_constant(tmp_path: Path) -> None:
    (plain,) = _noises(tmp_path)
    (offset,) = _noises(tmp_path, noise_offset=0.5)
    extra = offset - plain
    assert torch.allclose(extra, extra.mean(dim=(2, 3), keepdim=True).expand_as(extra), atol=1e-6)
    assert 0.3 < float(extra.mean(dim=(2, 3)).std()) < 0.7  # ~ the offset


def test_multires_noise_adds_smooth_structure_and_keeps_unit_variance(tmp_path: Path) -> None:
    (plain,) = _noises(tmp_path)
    (multi,) = _noises(tmp_path, multires_noise_iterations=2, multires_noise_discount=0.8)
    per_image = multi.std(dim=(1, 2, 3))
    assert torch.allclose(per_image, torch.ones_like(per_image), atol=1e-4)
    extra = multi - plain
    neighbour = (extra[..., 1:] - extra[..., :-1]).var()
    assert extra.abs().max() > 0.05 and neighbour < extra.var()  # white noise would give 2 x its variance


def test_input_perturbation_noises_the_input_more_than_the_target(tmp_path: Path) -> None:
    target_noise, input_noise = _noises(tmp_path, ip_noise_gamma=0.2)
    assert 0.15 < float((input_noise - target_noise).std()) < 0.25
    (plain,) = _noises(tmp_path)
    assert torch.equal(target_noise, plain)  # the target's noise is the one without the option


def test_noise_offset_on_a_flow_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job = tiny_job(tmp_path)
    job["model"] = {"arch": "flux", "options": {"preset": "tiny"}}
    job["train"]["noise_offset"] = 0.1
    assert main(["validate", str(write_yaml(tmp_path / "job.yaml", job))]) == EXIT_USER_ERROR
    assert "train.noise_offset" in capsys.readouterr().err
