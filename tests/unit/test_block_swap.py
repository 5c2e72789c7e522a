"""Block swap moves frozen block weights between host and device around each block's forward and backward
without changing a single number: on the CPU the "host" copy a parked weight shows is NaN, so any read
outside its window would poison the loss, and the loss trajectory and the trained LoRA weights must equal a
run without swap, with and without gradient checkpointing (reentrant or not), on a quantised base too."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from eridiffusion.config.schema import JobConfig
from eridiffusion.data.loader import Batch
from eridiffusion.models import build_family
from eridiffusion.models.protocol import SwappableBlocks
from eridiffusion.models.quantize import quantize_module
from eridiffusion.training.block_swap import BlockSwap, config_problem, swap_problem, swapped_blocks
from eridiffusion.training.stages import trainable_parameters
from eridiffusion.training.step import diffusion_loss

CPU = torch.device("cpu")


def nan_placeholder(t: torch.Tensor) -> torch.Tensor:
    """What a parked plain tensor shows on the CPU: reading it outside its window gives NaN (zero codes for
    a packed nf4 weight: a wrong value)."""
    if type(t) not in (torch.Tensor, nn.Parameter):
        return t
    return torch.full_like(t, float("nan")) if t.is_floating_point() else torch.zeros_like(t)


def parked(block: nn.Module) -> bool:
    frozen = [p for p in block.parameters() if not p.requires_grad and p.is_floating_point()]
    frozen = [p for p in frozen if type(p.data) is torch.Tensor]
    return bool(frozen) and all(torch.isnan(p).all() for p in frozen)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.register_buffer("shift", torch.randn(8))
        self.requires_grad_(False)
        self.lora = nn.Parameter(torch.randn(8, 8) * 0.1)  # trained: stays on the device

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.b(torch.tanh(self.a(x) + x @ self.lora + self.shift))
        return h, h.detach()


class Net(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.blocks, self.mode = nn.ModuleList(Block() for _ in range(4)), mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = (checkpoint(b, x, use_reentrant=self.mode == "reentrant") if self.mode != "none" else b(x))[0]
        return x.square().mean()


@pytest.mark.parametrize("mode", ["none", "checkpoint", "reentrant"])
def test_a_swapped_net_trains_exactly_as_the_whole_one(mode: str) -> None:
    torch.manual_seed(0)
    ref = Net(mode)
    net = copy.deepcopy(ref)
    log: list[tuple[str, int]] = []
    swap = BlockSwap(list(net.blocks)[1:], CPU, placeholder=nan_placeholder, log=log)
    x = torch.randn(3, 8, requires_grad=mode == "reentrant")  # reentrant checkpoints need a grad input
    losses: dict[str, list[float]] = {"ref": [], "swap": []}
    for name, model in (("ref", ref), ("swap", net)):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
        for _ in range(3):
            loss = model(x)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
            if name == "swap":  # between steps only the first swapped block (the last backward) is in
                assert [parked(b) for b in net.blocks] == [False, False, True, True]
    assert losses["swap"] == losses["ref"]
    for a, b in zip(ref.blocks, net.blocks, strict=True):
        assert torch.equal(a.lora, b.lora)
    assert {i for kind, i in log if kind == "in"} == {0, 1, 2} and ("out", 2) in log
    # no copy wasted: 3 in for the first forward and 2 for its backward (the last stays in between), then
    # 2 + 2 a step (the first is still in from the backward); reentrant checkpoints run the forward without
    # grad, so the last one also leaves and comes back once a step
    assert swap.copies == {"none": 13, "checkpoint": 13, "reentrant": 16}[mode]
    with torch.no_grad():  # sampling: each block in and straight out again
        assert net(x).item() == ref(x).item()
    assert [parked(b) for b in net.blocks] == [False, True, True, True]
    swap.remove()
    assert "forward" not in net.blocks[1].__dict__ and net(x).item() == ref(x).item()


def test_place_leaves_the_swapped_weights_where_they_are() -> None:
    net = Net("none")
    swap = BlockSwap(list(net.blocks)[2:], torch.device("meta"))
    swap.place(net)  # everything else goes to the "device"
    assert net.blocks[0].a.weight.device.type == "meta" and net.blocks[3].lora.device.type == "meta"
    assert net.blocks[3].a.weight.device.type == "cpu" and net.blocks[3].shift.device.type == "cpu"


def flow_job(arch: str, **train: Any) -> JobConfig:
    return JobConfig.model_validate(
        {
            "name": "swap",
            "model": {"arch": arch, "options": {"preset": "tiny"}},
            "network": {"type": "lora", "linear": 4, "linear_alpha": 4},
            "train": {"batch_size": 2, "mixed_precision": "no", "train_text_encoder": False, **train},
            "datasets": [{"folder_path": "unused", "resolution": 32}],
        }
    )


def batch(n: int = 2, side: int = 32) -> Batch:
    gen = torch.Generator().manual_seed(1)
    return Batch(
        pixels=torch.rand(n, 3, side, side, generator=gen) * 2 - 1,
        captions=["a red circle", "a blue square"][:n],
        dropout_rates=torch.zeros(n),
        epoch=0,
        loss_weights=torch.ones(n),
        original_sizes=torch.full((n, 2), side),
        crops=torch.zeros(n, 2, dtype=torch.long),
    )


def train_steps(
    arch: str, swap: bool, checkpointing: bool, quantize: str
) -> tuple[list[float], list[torch.Tensor], list[torch.Tensor]]:
    """Three AdamW steps of a tiny model's LoRA, every block swapped or none; (losses, LoRA weights before,
    after)."""
    cfg = flow_job(arch, gradient_checkpointing=checkpointing)
    family = build_family(arch, {"preset": "tiny"}, seed=0)
    if quantize != "none":
        quantize_module(family.modules()["denoiser"], quantize)
    params = trainable_parameters(family, cfg)
    assert isinstance(family, SwappableBlocks)
    blocks = family.swappable_blocks() if swap else []
    hooks = BlockSwap(blocks, CPU, placeholder=nan_placeholder) if swap else None
    before = [p.detach().clone() for p in params.values()]
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    losses = []
    for step in range(3):
        loss = diffusion_loss(family, batch(), cfg, torch.Generator().manual_seed(step), CPU)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        assert all(parked(b) for b in blocks[1:])  # outside their windows, on the host
    if hooks is not None:
        hooks.remove()
    return losses, before, [p.detach().clone() for p in params.values()]


@pytest.mark.parametrize(
    ("arch", "checkpointing", "quantize"),
    [
        ("flux", False, "none"),
        ("flux", True, "none"),
        ("sd3", False, "none"),
        ("sd3", True, "none"),
        ("flux", True, "int8"),
        ("flux", False, "nf4"),
        ("sd3", True, "nf4"),
    ],
)
def test_tiny_flow_models_train_the_same_with_swap(arch: str, checkpointing: bool, quantize: str) -> None:
    ref_losses, initial, ref_lora = train_steps(arch, False, checkpointing, quantize)
    losses, _, lora = train_steps(arch, True, checkpointing, quantize)
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=1e-7)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(lora, ref_lora, strict=True))
    assert sum(not torch.equal(a, b) for a, b in zip(lora, initial, strict=True)) > len(lora) // 2  # trained


def test_refusals_name_the_setting() -> None:
    flux = build_family("flux", {"preset": "tiny"}, seed=0)
    assert swap_problem(flux, 1) is None and swapped_blocks(flux, 1) == flux.swappable_blocks()  # all 3 turn
    assert "2 would leave fewer than two of the denoiser's 3 blocks on the device" in str(
        swap_problem(flux, 2)
    )
    assert "at most 0" in str(swap_problem(build_family("sd3", {"preset": "tiny"}, seed=0), 1))
    sdxl = build_family("sdxl", {"preset": "tiny"}, seed=0)
    assert "train.blocks_to_swap: sdxl has no list of repeated transformer blocks" in str(
        swap_problem(sdxl, 1)
    )
    full = flow_job("flux").model_copy(update={"network": None})
    assert "full fine-tune" in str(config_problem(full, 1)) and config_problem(full, 0) is None


class Wide(nn.Module):
    """Blocks whose frozen weights dwarf the activations, so the device's peak shows the swap."""

    def __init__(self, blocks: int, width: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(blocks))
        self.requires_grad_(False)
        self.lora = nn.ParameterList(nn.Parameter(torch.zeros(width)) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, bias in zip(self.blocks, self.lora, strict=True):
            x = checkpoint(block, x + bias, use_reentrant=False)
        return x.square().mean()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side stream and the device peak need CUDA")
def test_on_cuda_the_peak_falls_and_the_numbers_stay() -> None:
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    ref = Wide(8, 2048)
    net = copy.deepcopy(ref)
    block = 2048 * 2049 * 4
    results = {}
    for name, model in (("ref", ref), ("swap", net)):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()  # the other model's weights stay there: not this one's peak
        torch.cuda.reset_peak_memory_stats()
        swap = BlockSwap(list(model.blocks)[2:], cuda) if name == "swap" else None  # 6 turn in 2 places
        if swap is not None:
            swap.place(model)
        else:
            model.to(cuda)
        opt = torch.optim.SGD(model.lora.parameters(), lr=0.1)
        x = torch.randn(64, 2048, device=cuda, generator=torch.Generator(cuda).manual_seed(1))
        losses = []
        for _ in range(3):
            loss = model(x)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        peak = torch.cuda.max_memory_allocated() - before
        results[name] = (losses, peak, [p.detach().cpu() for p in model.lora])
    assert results["swap"][0] == pytest.approx(results["ref"][0], rel=1e-6)
    assert all(torch.allclose(a, b) for a, b in zip(results["swap"][2], results["ref"][2], strict=True))
    assert results["ref"][1] - results["swap"][1] > 3.5 * block  # 4 of 8 blocks' weights off the device
