"""Every optimizer trains the tiny family, and stopping, reloading its state dict and going on gives
bit-identical weights to never stopping (what resume from a checkpoint relies on)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from eridiffusion.cli import main
from eridiffusion.config.schema import OptimizerConfig
from eridiffusion.models import ModelFamily, build_family
from eridiffusion.training.optim import build_optimizer
from tests.conftest import TINY_OPTIONS, tiny_job, write_yaml

CASES: list[tuple[str, dict[str, Any], float]] = [
    ("adamw", {}, 1e-3),
    ("adamw8bit", {}, 1e-3),
    ("sgd", {}, 0.05),
    ("prodigy", {}, 1.0),
    ("adafactor", {}, 1e-3),
    ("adafactor", {"relative_step": True, "warmup_init": False}, 1e-3),
    ("lion", {}, 1e-4),
    ("lion8bit", {}, 1e-4),
    ("adamw_schedulefree", {"warmup_steps": 0}, 1e-3),
    ("came", {}, 1e-3),
]


def fresh() -> tuple[ModelFamily, dict[str, nn.Parameter]]:
    family = build_family("tiny", dict(TINY_OPTIONS), seed=0)
    denoiser = family.modules()["denoiser"]
    return family, {f"denoiser.{n}": p for n, p in denoiser.named_parameters()}


def loss_of(family: ModelFamily, seed: int) -> torch.Tensor:
    """The diffusion loss on a batch fixed by ``seed`` (same images, noise and timesteps each call)."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.rand(4, 3, 16, 16, generator=gen) * 2 - 1
    with torch.no_grad():
        x0 = family.encode_images(pixels)
        cond = family.encode_prompt(["a red circle", "a blue square", "a green star", "a red square"])
    t = family.objective.sample_timesteps(4, gen)
    target = family.objective.make_target(x0, torch.randn(x0.shape, generator=gen), t)
    pred = family.predict(target.noisy, t, cond)
    return torch.nn.functional.mse_loss(pred, target.target)


def steps(family: ModelFamily, opt: torch.optim.Optimizer, seeds: range) -> None:
    for seed in seeds:
        loss_of(family, seed).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    ("kind", "params", "lr"), CASES, ids=[f"{k}{'-' + str(p) if p else ''}" for k, p, _ in CASES]
)
def test_trains_tiny_and_resumes_exactly(kind: str, params: dict[str, Any], lr: float) -> None:
    cfg = OptimizerConfig(type=kind, params=params, weight_decay=0.0)
    family, weights = fresh()
    opt = build_optimizer(weights, cfg, lr)
    with torch.no_grad():
        before = loss_of(family, 0).item()
    steps(family, opt, range(3))
    saved_weights = {k: p.detach().clone() for k, p in weights.items()}
    saved_state = copy.deepcopy(opt.state_dict())
    steps(family, opt, range(3, 6))
    with torch.no_grad():
        after = loss_of(family, 0).item()
    assert after < before, f"{kind}: loss {before:.4f} -> {after:.4f} on the batch it saw first"

    family2, weights2 = fresh()
    with torch.no_grad():
        for name, p in weights2.items():
            p.copy_(saved_weights[name])
    opt2 = build_optimizer(weights2, cfg, lr)
    opt2.load_state_dict(saved_state)
    steps(family2, opt2, range(3, 6))
    for name, p in weights.items():
        assert torch.equal(p, weights2[name]), f"{kind}: {name} differs after resume"


@pytest.mark.parametrize(
    "optimizer",
    [
        {"type": "adamw_schedulefree"},
        {"type": "adafactor", "params": {"relative_step": True}},
        {"type": "lion8bit"},
    ],
    ids=["schedulefree", "adafactor-relative", "lion8bit"],
)
def test_eri_train_runs_with_the_optimizer(
    optimizer: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The current training loop drives each kind (schedule-free needs train mode, relative-step Adafactor
    ignores the loop's LR) and writes a checkpoint whose optimizer state a resumed run loads."""
    job = tiny_job(tmp_path)
    job["train"].update(steps=2, lr_warmup_steps=0, optimizer=optimizer)
    write_yaml(tmp_path / "job.yaml", job)
    assert main(["train", str(tmp_path / "job.yaml")]) == 0
    assert "trained t: 2 steps" in capsys.readouterr().out
    path = str(tmp_path / "job.yaml")
    assert main(["train", path, "train.steps=3"]) == 0  # resumes: the saved optimizer state loads back
    assert "trained t: 3 steps" in capsys.readouterr().out
