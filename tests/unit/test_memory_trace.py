"""LiveMemory counts storages exactly: hand-computed bytes for small modules, views, frees, categories, and
the same figures on fake tensors as on real ones; and it agrees with torch's MemTracker."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from eridiffusion.training.memory_trace import (
    ACTIVATIONS,
    CACHES,
    GRADS,
    TRAINABLE,
    WEIGHTS,
    LiveMemory,
    frozen_safe_memtracker,
    memtracker_peak,
)

F32 = 4


def _linear_step(fake: bool) -> tuple[LiveMemory, list[torch.Tensor]]:
    """x (32x256) -> Linear(256, 128, no bias) -> sum -> backward, counted byte-exact (no rounding)."""
    with FakeTensorMode() if fake else contextlib.nullcontext():
        torch.manual_seed(0)
        layer = nn.Linear(256, 128, bias=False)
        tracker = LiveMemory(block=1)
        tracker.track(layer.weight, TRAINABLE)
        layer.weight.register_post_accumulate_grad_hook(lambda p: tracker.track(p.grad, GRADS))
        with tracker:
            x = torch.randn(32, 256)
            assert tracker.current == (128 * 256 + 32 * 256) * F32
            y = layer(x)
            assert tracker.totals[ACTIVATIONS] == (32 * 256 + 32 * 128) * F32
            y.sum().backward()
    return tracker, [layer.weight, x, y]  # alive: the tracker counts what is referenced


@pytest.mark.parametrize("fake", [False, True], ids=["real", "fake"])
def test_linear_step_bytes_by_hand(fake: bool) -> None:
    tracker, _alive = _linear_step(fake)
    weight, x, y = 128 * 256 * F32, 32 * 256 * F32, 32 * 128 * F32
    assert tracker.totals[TRAINABLE] == weight
    assert tracker.totals[GRADS] == weight  # the accumulated gradient moved out of activations
    # at the peak: weight, x, y, the loss scalar, its gradient (a scalar: sum's backward expands it as a
    # view) and the weight gradient
    assert tracker.peak == weight + x + y + F32 + F32 + weight
    assert tracker.at_peak[TRAINABLE] == weight


def test_views_share_storage_and_free_on_last_reference() -> None:
    tracker = LiveMemory(block=1)
    with tracker:
        x = torch.zeros(1000)
        v = x[10:20].view(2, 5)
        t = x.t() if x.dim() == 2 else x.unsqueeze(0)
        assert tracker.current == 4000  # views add nothing
        del x, t
        assert tracker.current == 4000  # v still holds the storage
        del v
        assert tracker.current == 0
        x = torch.zeros(10)
        x.add_(1)  # in place: same storage
        assert tracker.current == 40
    assert tracker.peak == 4000


def test_rounding_quantised_bytes_and_constants() -> None:
    tracker = LiveMemory()  # 512-byte blocks, as the CUDA caching allocator
    w = torch.zeros(10, 10)
    tracker.track(w, WEIGHTS)
    assert tracker.current == 512
    big = torch.zeros(1000, 1000)
    tracker.track(big, WEIGHTS, nbytes=1000 * 1000)  # an int8 weight, rounded up to whole blocks
    assert tracker.totals[WEIGHTS] == 512 + 1954 * 512
    tracker.track(big, TRAINABLE)  # moving categories keeps the size
    assert tracker.totals[TRAINABLE] == 1954 * 512 and tracker.totals[WEIGHTS] == 512
    tracker.add_constant(CACHES, 100)
    assert tracker.current == 512 + 1954 * 512 + 100 == tracker.peak


def test_casts_of_trained_weights_count_as_caches() -> None:
    layer = nn.Linear(64, 64)
    tracker = LiveMemory(block=1)
    tracker.track(layer.weight, TRAINABLE)
    tracker.track(layer.bias, TRAINABLE)
    tracker.cast_sources([layer.weight, layer.bias])
    with tracker, torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.zeros(8, 64))
    assert tracker.at_peak[CACHES] >= 64 * 64 * 2  # autocast's bf16 copy of the weight
    assert out.dtype == torch.bfloat16


def test_paused_operators_are_not_counted() -> None:
    tracker = LiveMemory(block=1)
    with tracker:
        with tracker.pause():
            hidden = torch.zeros(100)
        kept = torch.zeros(10)
    assert tracker.peak == 40 and hidden.numel() + kept.numel() == 110


def test_agrees_with_torch_memtracker_on_a_small_mlp_with_frozen_layers() -> None:
    """Same step, both trackers (512-byte rounding in both): within 1 % of each other."""

    def run(kind: str) -> int:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(128, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 64)
        )
        model[0].requires_grad_(False)
        trained = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trained, lr=1e-3)
        x = torch.randn(64, 128)

        def step() -> None:
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # optimizer state exists before the measured step
        if kind == "ours":
            tracker = LiveMemory()
            for t in [*model.parameters(), *(v for s in opt.state.values() for v in s.values()), x]:
                tracker.track(t, WEIGHTS)
            with tracker:
                step()
            return tracker.peak
        mt = frozen_safe_memtracker()
        mt.track_external(model, opt, x)
        with mt:
            step()
        return memtracker_peak(mt)

    ours, theirs = run("ours"), run("memtracker")
    assert abs(ours - theirs) / theirs < 0.01, (ours, theirs)
