"""Optimizer construction: weight decay only on matrices, never on biases, norms or embeddings."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from eridiffusion.config.schema import OptimizerConfig
from eridiffusion.training.optim import build_optimizer


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


def test_adamw8bit_without_bitsandbytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(RuntimeError, match="adamw8bit needs bitsandbytes: pip install bitsandbytes"):
        build_optimizer(dict(Net().named_parameters()), OptimizerConfig(type="adamw8bit"), lr=1.0)


def test_unknown_optimizer() -> None:
    cfg = OptimizerConfig.model_construct(type="lion", weight_decay=0.0, betas=(0.9, 0.99), eps=1e-8)
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        build_optimizer(dict(Net().named_parameters()), cfg, lr=1.0)


def test_schema_rejects_unknown_optimizer_type() -> None:
    with pytest.raises(ValueError, match="Input should be 'adamw', 'adamw8bit' or 'sgd'"):
        OptimizerConfig(type="lion")
