"""Optimizer construction: weight decay only on matrices, never on biases, norms or embeddings."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from eridiffusion.cli import EXIT_USER_ERROR, main
from eridiffusion.config.schema import OptimizerConfig, TrainConfig
from eridiffusion.training.optim import OPTIMIZERS, build_optimizer, eval_mode, optimizer_problems
from tests.conftest import tiny_job, write_yaml


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.conv = nn.Conv2d(4, 4, 3)
        self.scale = nn.Parameter(torch.ones(4))


def group_names(opt: torch.optim.Optimizer, params: dict[str, nn.Parameter]) -> list[tuple[float, list[str]]]:
    by_id = {id(p): n for n, p in params.items()}
    return [(g["weight_decay"], sorted(by_id[id(p)] for p in g["params"])) for g in opt.param_groups]


def test_decay_and_no_decay_groups() -> None:
    params = dict(Net().named_parameters())
    opt = build_optimizer(params, OptimizerConfig(weight_decay=0.05), lr=2e-4)
    assert isinstance(opt, torch.optim.AdamW)
    assert group_names(opt, params) == [
        (0.05, ["conv.weight", "proj.weight"]),
        (0.0, ["conv.bias", "norm.bias", "norm.weight", "proj.bias", "scale", "token_embedding.weight"]),
    ]


def test_hyperparameters_passed_through() -> None:
    params = dict(Net().named_parameters())
    opt = build_optimizer(params, OptimizerConfig(betas=(0.8, 0.95), eps=1e-6), lr=3e-4)
    for group in opt.param_groups:
        assert group["lr"] == 3e-4
        assert group["betas"] == (0.8, 0.95)
        assert group["eps"] == 1e-6


def test_norm_named_matrix_gets_no_decay() -> None:
    params = {"block.norm_proj": nn.Parameter(torch.ones(3, 3)), "block.proj": nn.Parameter(torch.ones(3, 3))}
    opt = build_optimizer(params, OptimizerConfig(weight_decay=0.1), lr=1.0)
    assert group_names(opt, params) == [(0.1, ["block.proj"]), (0.0, ["block.norm_proj"])]


def test_empty_group_dropped() -> None:
    params = {"bias": nn.Parameter(torch.zeros(3))}
    opt = build_optimizer(params, OptimizerConfig(), lr=1.0)
    assert group_names(opt, params) == [(0.0, ["bias"])]


def test_decay_applied_only_to_decay_group() -> None:
    params = {"w": nn.Parameter(torch.ones(2, 2)), "b": nn.Parameter(torch.ones(2))}
    opt = build_optimizer(params, OptimizerConfig(weight_decay=0.5), lr=0.1)
    for p in params.values():
        p.grad = torch.zeros_like(p)
    opt.step()
    # zero gradient: AdamW's update is pure decoupled decay, p *= 1 - lr * wd
    torch.testing.assert_close(params["w"].detach(), torch.full((2, 2), 0.95))
    torch.testing.assert_close(params["b"].detach(), torch.ones(2))


def test_sgd_uses_first_beta_as_momentum() -> None:
    params = dict(Net().named_parameters())
    opt = build_optimizer(params, OptimizerConfig(type="sgd", betas=(0.7, 0.999)), lr=0.5)
    assert isinstance(opt, torch.optim.SGD)
    assert [g["momentum"] for g in opt.param_groups] == [0.7, 0.7]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]


@pytest.mark.parametrize(
    ("kind", "module", "package"),
    [
        ("adamw8bit", "bitsandbytes", "bitsandbytes"),
        ("lion8bit", "bitsandbytes", "bitsandbytes"),
        ("prodigy", "prodigyopt", "prodigyopt"),
        ("adamw_schedulefree", "schedulefree", "schedulefree"),
        ("came", "came_pytorch", "came-pytorch"),
    ],
)
def test_optional_optimizer_missing_says_what_to_install(
    kind: str, module: str, package: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    monkeypatch.setitem(sys.modules, OPTIMIZERS[kind].module, None)  # also when already imported
    with pytest.raises(
        ValueError, match=f"train.optimizer.type={kind} needs {package}: pip install {package}"
    ):
        build_optimizer(dict(Net().named_parameters()), OptimizerConfig(type=kind), lr=1.0)


def test_unknown_optimizer() -> None:
    cfg = OptimizerConfig.model_construct(
        type="rmsprop", weight_decay=0.0, betas=(0.9, 0.99), eps=1e-8, params={}
    )
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        build_optimizer(dict(Net().named_parameters()), cfg, lr=1.0)


def test_schema_rejects_unknown_optimizer_type() -> None:
    with pytest.raises(ValueError, match="Input should be 'adamw', 'adamw8bit', 'sgd', 'prodigy'"):
        OptimizerConfig(type="rmsprop")


def test_params_passed_to_the_constructor() -> None:
    params = dict(Net().named_parameters())
    opt = build_optimizer(params, OptimizerConfig(type="prodigy", params={"d_coef": 2.0}), lr=1.0)
    assert [g["d_coef"] for g in opt.param_groups] == [2.0, 2.0]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]


def test_unknown_param_names_the_yaml_path_and_the_choices() -> None:
    cfg = OptimizerConfig(type="prodigy", params={"d_coeff": 2.0, "lr": 1.0})
    assert optimizer_problems(cfg) == [
        "train.optimizer.params.d_coeff: Prodigy has no argument 'd_coeff'; it takes: beta3, betas, d0, "
        "d_coef, decouple, eps, fsdp_in_use, growth_rate, safeguard_warmup, slice_p, use_bias_correction",
        "train.optimizer.params.lr: set it as train.lr instead",
    ]
    with pytest.raises(ValueError, match="train.optimizer.params.d_coeff: Prodigy has no argument"):
        build_optimizer(dict(Net().named_parameters()), cfg, lr=1.0)


def test_bad_param_value_names_the_section() -> None:
    cfg = OptimizerConfig(type="sgd", params={"momentum": -1})
    assert optimizer_problems(cfg) == []  # the name is fine; values are the constructor's to judge
    with pytest.raises(ValueError, match="train.optimizer: SGD refused its settings: Invalid momentum value"):
        build_optimizer(dict(Net().named_parameters()), cfg, lr=1.0)


def test_adafactor_fixed_lr_and_relative_step() -> None:
    params = dict(Net().named_parameters())
    fixed = build_optimizer(params, OptimizerConfig(type="adafactor"), lr=1e-3)
    assert [(g["lr"], g["relative_step"], g["scale_parameter"]) for g in fixed.param_groups] == [
        (1e-3, False, False)
    ] * 2
    relative = build_optimizer(
        params, OptimizerConfig(type="adafactor", params={"relative_step": True}), 1e-3
    )
    assert [(g["lr"], g["relative_step"]) for g in relative.param_groups] == [(None, True)] * 2


@pytest.mark.parametrize(
    ("optimizer", "schedule"),
    [
        ({"type": "adamw_schedulefree"}, {"lr_scheduler": "cosine"}),
        ({"type": "adamw_schedulefree"}, {"lr_warmup_steps": 10}),
        ({"type": "adafactor", "params": {"relative_step": True}}, {"lr_scheduler": "linear"}),
    ],
)
def test_optimizers_with_their_own_step_size_refuse_a_schedule(optimizer: dict, schedule: dict) -> None:
    with pytest.raises(ValueError, match="so it takes no LR schedule: set lr_scheduler: constant"):
        TrainConfig(optimizer=optimizer, **schedule)
    TrainConfig(optimizer=optimizer, lr_scheduler="constant_with_warmup")  # no warmup: allowed


def test_schedule_free_eval_mode_swaps_in_the_average() -> None:
    params = {"w": nn.Parameter(torch.ones(3, 3))}
    opt = build_optimizer(params, OptimizerConfig(type="adamw_schedulefree", weight_decay=0.0), lr=0.1)
    for _ in range(3):
        params["w"].grad = torch.ones(3, 3)
        opt.step()
    training = params["w"].detach().clone()
    with eval_mode(opt):
        averaged = params["w"].detach().clone()
    assert not torch.equal(training, averaged)
    torch.testing.assert_close(params["w"].detach(), training)  # back in train mode afterwards
    with eval_mode(build_optimizer(params, OptimizerConfig(), lr=0.1)):  # a no-op for the others
        torch.testing.assert_close(params["w"].detach(), training)


def test_validate_lists_optimizer_problems_with_their_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    job = tiny_job(tmp_path)
    job["train"]["optimizer"] = {"type": "lion", "params": {"beta": 0.9}}
    assert main(["validate", str(write_yaml(tmp_path / "job.yaml", job))]) == EXIT_USER_ERROR
    assert (
        "train.optimizer.params.beta: Lion has no argument 'beta'; it takes: args, betas"
        in capsys.readouterr().err
    )


def test_pipeline_steps_apply_optimizer_params_and_schedule_shape(tmp_path: Path) -> None:
    """One engine: a pipeline step's groups take train.optimizer.params, lr_cycles and lr_power (or
    their own), as a single-stage job does."""
    import json

    import torch

    from eridiffusion.cli import main
    from tests.conftest import write_yaml

    job = tiny_job(tmp_path)
    job["train"].update(
        optimizer={"type": "prodigy", "params": {"d_coef": 2.0}},
        lr=1.0,
        lr_scheduler="polynomial",
        lr_power=2.0,
        lr_warmup_steps=0,
        ema={"enabled": False},
    )
    job["save"] = {"every": 1, "keep": 10}
    job["pipeline"] = {"steps": [{"name": "a", "trainable": ["denoiser"], "max_steps": 4}]}
    assert main(["train", str(write_yaml(tmp_path / "p.yaml", job))]) == 0
    run = tmp_path / "output" / "t"
    opt = torch.load(run / "checkpoints" / "step_000002" / "optimizer.pt", weights_only=False)
    assert opt["denoiser"]["param_groups"][0]["d_coef"] == 2.0
    lrs = [json.loads(x)["lr"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([1.0, 0.75**2, 0.5**2, 0.25**2])


def test_prodigy_with_a_small_lr_warns(caplog: pytest.LogCaptureFixture) -> None:
    build_optimizer(dict(Net().named_parameters()), OptimizerConfig(type="prodigy"), lr=1e-4)
    assert "prodigy estimates the step size itself and expects train.lr near 1.0" in caplog.text
