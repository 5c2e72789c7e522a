"""Exponential moving average: decay warmup, update arithmetic and swapping weights in and out."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from eridiffusion.training.ema import EMA


def param(*values: float) -> nn.Parameter:
    return nn.Parameter(torch.tensor(values))


@pytest.mark.parametrize(
    ("num_updates", "decay", "expected"),
    [(0, 0.999, 1 / 10), (1, 0.999, 2 / 11), (10, 0.999, 11 / 20), (90, 0.999, 91 / 100), (10, 0.5, 0.5)],
)
def test_warmup_decay_is_min_of_decay_and_ramp(num_updates: int, decay: float, expected: float) -> None:
    ema = EMA({"w": param(0.0)}, decay=decay, warmup=True)
    ema.num_updates = num_updates
    assert ema.current_decay() == pytest.approx(expected)


def test_decay_without_warmup_is_constant() -> None:
    ema = EMA({"w": param(0.0)}, decay=0.9, warmup=False)
    ema.num_updates = 0
    assert ema.current_decay() == 0.9


def test_update_math_without_warmup() -> None:
    p = param(2.0, -1.0)
    ema = EMA({"w": p}, decay=0.9, warmup=False)
    with torch.no_grad():
        p.copy_(torch.tensor([4.0, 1.0]))
    ema.update({"w": p})
    # 0.9 * shadow + 0.1 * live
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([2.2, -0.8]))
    with torch.no_grad():
        p.zero_()
    ema.update({"w": p})
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([1.98, -0.72]))
    assert ema.num_updates == 2


def test_first_update_with_warmup_uses_decay_one_tenth() -> None:
    p = param(2.0)
    ema = EMA({"w": p}, decay=0.999, warmup=True)
    with torch.no_grad():
        p.fill_(4.0)
    ema.update({"w": p})
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([0.1 * 2.0 + 0.9 * 4.0]))


def test_shadow_is_a_float32_copy() -> None:
    p = nn.Parameter(torch.tensor([1.5], dtype=torch.bfloat16))
    ema = EMA({"w": p}, decay=0.9)
    assert ema.shadow["w"].dtype == torch.float32
    with torch.no_grad():
        p.fill_(3.0)
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([1.5]))


def test_swap_into_exchanges_and_twice_restores() -> None:
    p = param(1.0, 2.0)
    ema = EMA({"w": p}, decay=0.9, warmup=False)
    with torch.no_grad():
        p.copy_(torch.tensor([5.0, 6.0]))
    ema.update({"w": p})  # shadow = [1.4, 2.4]
    ema.swap_into({"w": p})
    torch.testing.assert_close(p.detach(), torch.tensor([1.4, 2.4]))
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([5.0, 6.0]))
    ema.swap_into({"w": p})
    torch.testing.assert_close(p.detach(), torch.tensor([5.0, 6.0]))
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([1.4, 2.4]))


def test_load_state_dict_restores_shadow_and_counter() -> None:
    ema = EMA({"a": param(0.0), "b": param(0.0)}, decay=0.9)
    ema.load_state_dict({"a": torch.tensor([1.0]), "b": torch.tensor([2.0])}, num_updates=7)
    assert ema.num_updates == 7
    torch.testing.assert_close(ema.state_dict()["b"], torch.tensor([2.0]))


def test_load_state_dict_missing_tensor() -> None:
    ema = EMA({"a": param(0.0), "b": param(0.0)}, decay=0.9)
    with pytest.raises(ValueError, match=r"EMA state lacks 1 tensors, e.g. \['b'\]"):
        ema.load_state_dict({"a": torch.tensor([1.0])}, num_updates=1)


def test_update_in_slices_of_bf16_weights_matches_fp32_arithmetic(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 trained weights (train.weights_dtype) are averaged a few tensors at a time, in fp32: the same
    result as one call over all of them."""
    gen = torch.Generator().manual_seed(0)
    live = {f"w{i}": nn.Parameter(torch.randn(5, generator=gen).to(torch.bfloat16)) for i in range(4)}
    whole, sliced = EMA(live, 0.9, warmup=False), EMA(live, 0.9, warmup=False)
    before = {n: p.detach().float() for n, p in live.items()}
    with torch.no_grad():
        for p in live.values():
            p.add_(1.0)
    whole.update(live)
    monkeypatch.setattr("eridiffusion.training.ema.SLICE", 7)  # two 5-value tensors never share a call
    sliced.update(live)
    for name, p in live.items():
        expected = 0.9 * before[name] + 0.1 * p.detach().float()
        assert whole.shadow[name].dtype == torch.float32
        torch.testing.assert_close(whole.shadow[name], expected)
        assert torch.equal(whole.shadow[name], sliced.shadow[name])
