"""bf16 trained weights (``train.weights_dtype: bf16``): the stochastic rounding is unbiased and exact where
bf16 is, the sliced optimizer step is the optimizer's own step, a full fine-tune with it follows the fp32
trajectory where round-to-nearest does not, and its state round-trips exactly."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from eridiffusion.config.schema import JobConfig, OptimizerConfig
from eridiffusion.training.bf16_weights import Bf16WeightsOptimizer, bf16_optimizer, stochastic_round
from eridiffusion.training.optim import build_optimizer
from tests.unit.test_optimizers_tiny import fresh, loss_of

SLICEABLE: list[tuple[str, dict[str, Any], float]] = [
    ("adamw", {}, 1e-4),
    ("adamw8bit", {}, 1e-4),
    ("sgd", {}, 0.01),
    ("adafactor", {}, 1e-4),
    ("lion", {}, 1e-5),
    ("came", {}, 1e-4),
]


def test_stochastic_rounding_is_unbiased() -> None:
    """Each value rounded 8192 times: the mean lands on the fp32 value within 0.05 of a bf16 step (the
    standard error is at most 1/180 of a step), where round-to-nearest is off by up to half a step."""
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(64, generator=gen) * torch.logspace(-6, 3, 64)
    step = 2 ** torch.floor(torch.log2(values.abs())) * 2**-7  # bf16's spacing around each value
    rounded = stochastic_round(values.repeat(8192, 1), gen).float()
    assert rounded.dtype == torch.float32
    error = (rounded.mean(0) - values).abs() / step
    assert error.max() < 0.05, error.max()
    nearest = (values.to(torch.bfloat16).float() - values).abs() / step
    assert nearest.max() > 0.2  # the test values are not all close to bf16 numbers


def test_stochastic_rounding_probability_and_exact_values() -> None:
    gen = torch.Generator().manual_seed(1)
    quarter = torch.full((100_000,), 1.0 + 2**-9)  # a quarter of the way from 1 to the next bf16 (1 + 2^-7)
    up = (stochastic_round(quarter, gen).float() > 1.0).float().mean().item()
    assert abs(up - 0.25) < 0.01
    exact = torch.randn(10_000, generator=gen).to(torch.bfloat16)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 3.3895e38], dtype=torch.bfloat16)
    for x in (exact, special):
        assert torch.equal(stochastic_round(x.float(), gen), x)
    assert torch.isnan(stochastic_round(torch.tensor([float("nan")]), gen)).all()
    a = stochastic_round(quarter[:100], torch.Generator().manual_seed(5))
    b = stochastic_round(quarter[:100], torch.Generator().manual_seed(5))
    assert torch.equal(a, b)  # a function of the generator's state: resume draws the same bits
    with pytest.raises(TypeError, match="fp32"):
        stochastic_round(exact, gen)


def _to_bf16(weights: dict[str, nn.Parameter]) -> None:
    for p in weights.values():
        p.data = p.data.to(torch.bfloat16)


def _train(
    rounding: str | None, steps: int, kind: str = "adamw", lr: float = 1e-4, chunk: int = 2**24, **params: Any
) -> tuple[list[float], dict[str, nn.Parameter], torch.optim.Optimizer]:
    """``steps`` AdamW steps on the tiny denoiser in bf16 autocast; ``rounding`` None keeps fp32 weights."""
    family, weights = fresh()
    if rounding is not None:
        _to_bf16(weights)
    opt = build_optimizer(weights, OptimizerConfig(type=kind, params=params), lr)
    if rounding is not None:
        opt = Bf16WeightsOptimizer(opt, rounding, seed=7, chunk_elements=chunk)
    losses = []
    for step in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(family, step % 4)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, weights, opt


def test_bf16_with_stochastic_rounding_follows_the_fp32_trajectory() -> None:
    """50 AdamW steps at lr 1e-4 on the tiny denoiser (4 fixed batches, bf16 autocast in every run).
    Measured (2-core CPU): mean |loss - fp32 loss| over the last 20 steps 0.00034 with stochastic rounding,
    0.00041 with Kahan, 0.069 with round-to-nearest, whose loss stays far above fp32's (0.963 against
    0.894: most of its updates round away). Asserted with a 20x margin."""
    reference, _, _ = _train(None, 50)
    gaps = {}
    for rounding in ("stochastic", "kahan", "nearest"):
        losses, weights, _ = _train(rounding, 50)
        assert all(p.dtype == torch.bfloat16 and p.grad is None for p in weights.values())
        gaps[rounding] = sum(abs(a - b) for a, b in zip(losses[-20:], reference[-20:], strict=True)) / 20
    assert gaps["stochastic"] * 20 < gaps["nearest"], gaps
    assert gaps["kahan"] * 20 < gaps["nearest"], gaps


@pytest.mark.parametrize(("kind", "params", "lr"), SLICEABLE, ids=[k for k, _, _ in SLICEABLE])
def test_sliced_step_equals_one_whole_step(kind: str, params: dict[str, Any], lr: float) -> None:
    """Stepping one tensor at a time gives bit-identical weights and state to stepping all together: the
    slicing that bounds the fp32 copies does not change the optimizer's arithmetic."""
    _, whole, opt_whole = _train("stochastic", 3, kind, lr, **params)
    _, sliced, opt_sliced = _train("stochastic", 3, kind, lr, chunk=1, **params)
    assert all(torch.equal(whole[k], sliced[k]) for k in whole)
    a, b = opt_whole.state_dict()["state"], opt_sliced.state_dict()["state"]
    for i in a:
        for key, value in a[i].items():
            if torch.is_tensor(value):
                assert torch.equal(value, b[i][key]), (kind, i, key)
                if value.is_floating_point() and value.numel() > 1 and key != "qmap1":
                    assert value.dtype == torch.float32, (kind, key)  # the moments are not bf16


@pytest.mark.parametrize("rounding", ["stochastic", "kahan"])
def test_state_round_trip_resumes_exactly(rounding: str) -> None:
    """Three steps, save the weights and the optimizer's state dict (fp32 moments, generator state or Kahan
    buffers), three more; a fresh model loaded from the save and stepped three times is bit-identical."""
    family, weights = fresh()
    _to_bf16(weights)
    cfg = OptimizerConfig(type="adamw")
    opt = Bf16WeightsOptimizer(build_optimizer(weights, cfg, 1e-4), rounding, seed=3)

    def run(family: Any, opt: torch.optim.Optimizer, seeds: range) -> None:
        for seed in seeds:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss_of(family, seed).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    run(family, opt, range(3))
    saved = {k: p.detach().clone() for k, p in weights.items()}
    state = copy.deepcopy(opt.state_dict())
    run(family, opt, range(3, 6))

    family2, weights2 = fresh()
    _to_bf16(weights2)
    with torch.no_grad():
        for k, p in weights2.items():
            p.copy_(saved[k])
    opt2 = Bf16WeightsOptimizer(build_optimizer(weights2, cfg, 1e-4), rounding, seed=99)
    opt2.load_state_dict(state)
    assert all(v.dtype == torch.float32 for s in opt2.state.values() for k, v in s.items() if k != "step")
    run(family2, opt2, range(3, 6))
    assert all(torch.equal(weights[k], weights2[k]) for k in weights)


def test_fp32_checkpoint_and_refused_optimizers_are_clear_errors() -> None:
    _, weights = fresh()
    fp32_state = build_optimizer(weights, OptimizerConfig(type="adamw"), 1e-4).state_dict()
    _to_bf16(weights)
    opt = Bf16WeightsOptimizer(build_optimizer(weights, OptimizerConfig(type="adamw"), 1e-4), "kahan", 0)
    with pytest.raises(ValueError, match="written with fp32 trained weights"):
        opt.load_state_dict(fp32_state)
    prodigy = build_optimizer(weights, OptimizerConfig(type="prodigy"), 1.0)
    with pytest.raises(ValueError, match="train.optimizer.type prodigy: its step-size estimate"):
        bf16_optimizer(prodigy, "prodigy", "stochastic", 0, "train.optimizer")


def _job(**train: Any) -> dict[str, Any]:
    return {"name": "j", "train": {"weights_dtype": "bf16", **train}, "datasets": [{"folder_path": "x"}]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"train": {"weights_dtype": "bf16", "optimizer": {"type": "prodigy"}}},
            "prodigy with weights_dtype",
        ),
        ({"train": {"weights_dtype": "bf16", "mixed_precision": "no"}}, "set train.mixed_precision to bf16"),
        ({"network": {"type": "lora"}}, "is for full fine-tunes"),
        ({"train": {"weights_dtype": "bf16", "weights_rounding": "up"}}, "weights_rounding"),
    ],
)
def test_config_refusals_name_the_setting(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        JobConfig.model_validate({**_job(), **change})
    assert JobConfig.model_validate(_job()).train.weights_rounding == "stochastic"


def test_a_failing_step_leaves_the_bf16_weights_as_they_were() -> None:
    """An optimizer error mid-step gives back the bf16 storage and gradients untouched (no half update)."""

    class Failing(torch.optim.SGD):
        def step(self, closure: Any = None) -> None:  # type: ignore[override]
            for group in self.param_groups:
                for q in group["params"]:
                    q.add_(1.0)
            raise RuntimeError("optimizer failed")

    p = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    p.grad = torch.full((4,), 0.5, dtype=torch.bfloat16)
    opt = Bf16WeightsOptimizer(Failing([p], lr=0.1), "stochastic", seed=0)
    with pytest.raises(RuntimeError, match="optimizer failed"):
        opt.step()
    assert p.dtype == p.grad.dtype == torch.bfloat16
    assert torch.equal(p.detach(), torch.ones(4, dtype=torch.bfloat16))
