"""Block swap (``train.blocks_to_swap: N``): the denoiser holds N fewer of its repeated blocks' frozen
weights on the device than it has blocks, so a 12B transformer's LoRA trains on a card smaller than its
weights. As kohya's ``--blocks_to_swap``: the last N + 2 blocks take turns in two places on the device (one
runs while the next arrives), the others stay there; N is at most the block count minus 2.

What moves: only a swapped block's frozen tensors (base weights, quantised or not, and buffers). Trainable
tensors (the adapter's) stay on the device, so their gradients and optimizer state never move. Frozen
weights never change, so a block leaves the device by dropping its device copy; only host -> device copies
are ever made, from a pinned host copy on CUDA.

When a block is on the device:

- forward: from just before its call until it returns (the next swapped block is copied in meanwhile, on a
  side CUDA stream; an event orders the copy before its use and ``record_stream`` keeps the allocator from
  reusing the memory while the compute stream may still read it);
- backward: from the moment the gradient of its output arrives (a tensor hook) until another block's
  backward starts, with the block before it prefetched. A gradient-checkpointed block is recomputed inside
  that window.

What makes this correct whatever the autograd engine's order: every weight tensor autograd saves during a
swapped block's forward is stored as a reference (saved-tensor hooks, layered over the checkpoint's own),
and reading it back copies the block in first if it is not there. The windows above only decide when the
copies happen; a read outside them costs a copy, never a wrong value.

Copies made from a weight during the forward (autocast's cast of an fp32 weight, a quantised weight's
dequantised copy) are new tensors, which autograd keeps until the block's backward unless the block is
gradient-checkpointed: the saving holds in full with ``train.gradient_checkpointing`` (or weights stored in
the compute dtype, ``model.dtype: bf16``, and no quantisation).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from eridiffusion.config.schema import JobConfig
from eridiffusion.models import ModelFamily
from eridiffusion.models.protocol import SwappableBlocks

logger = logging.getLogger(__name__)

Hooks = tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]


def swap_problem(family: ModelFamily, n: int) -> str | None:
    """Why ``n`` blocks of this model cannot be swapped (None when they can, or ``n`` is 0)."""
    if not n:
        return None
    if not isinstance(family, SwappableBlocks):
        return (
            f"train.blocks_to_swap: {family.arch} has no list of repeated transformer blocks to swap "
            "(only flux and sd3 do); set it to 0"
        )
    total = len(family.swappable_blocks())
    if n > total - 2:
        return (
            f"train.blocks_to_swap: {n} would leave fewer than two of the denoiser's {total} blocks on the "
            f"device (one runs while the next arrives); at most {total - 2}"
        )
    return None


def config_problem(cfg: JobConfig, n: int) -> str | None:
    """What the config alone rules out: only frozen base weights of a single-stage adapter job are swapped."""
    if not n:
        return None
    if cfg.pipeline is not None:
        return "train.blocks_to_swap: applies to single-stage jobs; remove it or the pipeline"
    if cfg.network is None:
        return (
            "train.blocks_to_swap: only frozen base weights are swapped, and a full fine-tune trains every "
            "block weight; train an adapter (network:) or set it to 0"
        )
    return None


def swapped_blocks(family: ModelFamily, n: int) -> list[nn.Module]:
    """The blocks that take turns on the device: the last ``n`` + 2 (kohya's choice: the ones the forward
    reaches last, so the first copies overlap the resident blocks' work); raises ValueError naming
    ``train.blocks_to_swap`` when it cannot be."""
    problem = swap_problem(family, n)
    if problem:
        raise ValueError(problem)
    if not n:
        return []
    assert isinstance(family, SwappableBlocks)
    blocks = family.swappable_blocks()
    return blocks[len(blocks) - n - 2 :]


@dataclass
class _Entry:
    """One frozen tensor of a swapped block: where it lives in the module, and its host copy."""

    owner: nn.Module
    name: str
    buffer: bool
    home: torch.Tensor


@dataclass
class _Slot:
    index: int
    module: nn.Module
    entries: list[_Entry]
    loaded: bool = False
    pending: tuple[list[torch.Tensor], Any] | None = None
    """Device copies under way on the side stream, and the event that marks them done."""


@dataclass(frozen=True)
class _SavedWeight:
    """What autograd keeps instead of a swapped weight (or a view of one): enough to rebuild it."""

    slot: int
    entry: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


def _plain(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter)


def _plain_parts(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``t``'s data (a quantised wrapper tensor's inner tensors)."""
    if not is_traceable_wrapper_subclass(t):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [part for name in names for part in _plain_parts(getattr(t, name))]


def _storage(t: torch.Tensor) -> int | None:
    """The address of a plain tensor's storage (None for wrapper tensors, meta and empty storages, which
    no weight can be told apart by)."""
    if is_traceable_wrapper_subclass(t) or t.device.type == "meta":
        return None
    storage = t.untyped_storage()
    return storage.data_ptr() if storage.nbytes() else None


class BlockSwap:
    """Keeps ``blocks``' frozen tensors on ``host`` except while they run on ``device`` (see the module doc).

    ``device`` and ``host`` may be the same (the CPU in tests); ``placeholder`` then says what a parked
    tensor shows instead of its host copy (e.g. NaNs), which proves nothing reads it outside its windows.
    ``log`` (when given) receives ``("in" | "out", block)`` for every move.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        device: torch.device,
        host: torch.device | None = None,
        placeholder: Callable[[torch.Tensor], torch.Tensor] | None = None,
        log: list[tuple[str, int]] | None = None,
    ) -> None:
        self.device, self.host = device, host or torch.device("cpu")
        self.placeholder, self.log = placeholder, log
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.copies = 0
        self._storages: dict[int, tuple[int, int]] = {}
        """Device storage address of a loaded swapped tensor -> (block, entry): how saved ones are known."""
        self._originals: dict[int, Any] = {}
        self.slots: list[_Slot] = []
        for i, block in enumerate(blocks):
            slot = _Slot(i, block, self._entries(block))
            self.slots.append(slot)
            self._park(slot, record=False)  # block by block: the host holds one extra block's copy at most
            self._originals[slot.index] = slot.module.__dict__.get("forward")
            slot.module.forward = partial(self._forward, slot, slot.module.forward)

    def _entries(self, block: nn.Module) -> list[_Entry]:
        pin = self.device.type == "cuda" and self.host.type == "cpu"
        entries = []
        for owner in block.modules():
            tensors = [(n, p, False) for n, p in owner._parameters.items() if p is not None]
            tensors += [(n, b, True) for n, b in owner._buffers.items() if b is not None]
            for name, t, buffer in tensors:
                if t.requires_grad:
                    continue  # trained: stays on the device with its gradient and optimizer state
                if _plain(t):
                    home = t.detach().to(self.host)
                    home = home.pin_memory() if pin else home  # copies from pinned memory are async
                else:  # a quantised weight keeps its class and what it carries (bitsandbytes' quant_state)
                    home = t if t.device == self.host else t.to(self.host)
                entries.append(_Entry(owner, name, buffer, home))
        return entries

    def place(self, module: nn.Module) -> None:
        """``module.to(device)`` for everything but the swapped tensors, which stay parked on the host."""
        held = [
            (e, e.owner._buffers if e.buffer else e.owner._parameters) for s in self.slots for e in s.entries
        ]
        values = [table[e.name] for e, table in held]
        for e, table in held:
            table[e.name] = None
        try:
            module.to(self.device)
        finally:
            for (e, table), value in zip(held, values, strict=True):
                table[e.name] = value

    def remove(self) -> None:
        """Unhook; the swapped tensors go back to being their host copies (the stage is over: the model is
        discarded or saved next, and moving 12B weights onto the card now could not fit)."""
        for slot in self.slots:
            original = self._originals.get(slot.index)
            if original is None:
                del slot.module.forward
            else:
                slot.module.forward = original
            self._set(slot, [e.home for e in slot.entries])
            self._forget(slot)
            slot.loaded, slot.pending = False, None

    # moves

    def _set(self, slot: _Slot, tensors: list[torch.Tensor]) -> None:
        for e, t in zip(slot.entries, tensors, strict=True):
            if e.buffer:
                e.owner._buffers[e.name] = t
            elif _plain(t):
                param = e.owner._parameters[e.name]
                assert param is not None
                param.data = t
            else:  # quantised weights move with their own .to() (their scales too) and are installed whole
                e.owner._parameters[e.name] = t if isinstance(t, nn.Parameter) else nn.Parameter(t, False)

    def _park(self, slot: _Slot, record: bool = True) -> None:
        shown = [self.placeholder(e.home) if self.placeholder else e.home for e in slot.entries]
        self._set(slot, shown)
        self._forget(slot)
        slot.loaded, slot.pending = False, None
        if record and self.log is not None:
            self.log.append(("out", slot.index))

    def _copy(self, slot: _Slot) -> None:
        """Start copying ``slot`` in: on the side stream on CUDA (waited for in :meth:`_load`)."""
        if slot.loaded or slot.pending is not None:
            return
        self.copies += 1
        if self.stream is None:
            slot.pending = ([e.home.to(self.device) for e in slot.entries], None)
            return
        with torch.cuda.stream(self.stream):
            tensors = [e.home.to(self.device, non_blocking=True) for e in slot.entries]
            done = torch.cuda.Event()
            done.record(self.stream)
        slot.pending = (tensors, done)

    def _load(self, slot: _Slot) -> None:
        if slot.loaded:
            return
        self._copy(slot)
        assert slot.pending is not None
        tensors, done = slot.pending
        if done is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(done)
            for t in tensors:
                for part in _plain_parts(t):
                    part.record_stream(compute)
        self._set(slot, tensors)
        slot.loaded, slot.pending = True, None
        for k, t in enumerate(tensors):
            if (address := _storage(t)) is not None:
                self._storages[address] = (slot.index, k)
        if self.log is not None:
            self.log.append(("in", slot.index))

    def _forget(self, slot: _Slot) -> None:
        for address in [a for a, (i, _) in self._storages.items() if i == slot.index]:
            del self._storages[address]

    def _only(self, keep: set[int]) -> None:
        """Park every loaded or arriving block but ``keep``."""
        for slot in self.slots:
            if slot.index not in keep and (slot.loaded or slot.pending is not None):
                self._park(slot)

    def _prefetch(self, index: int) -> None:
        if 0 <= index < len(self.slots):
            self._copy(self.slots[index])

    # windows

    def _forward(self, slot: _Slot, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        in_backward = torch._C._current_graph_task_id() != -1  # a checkpointed block is being recomputed
        if in_backward:
            self._backward_window(slot)
        else:
            self._load(slot)
            self._prefetch(slot.index + 1)
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        with torch.autograd.graph.saved_tensors_hooks(
            partial(self._pack, outer), partial(self._unpack, outer)
        ):
            out = forward(*args, **kwargs)
        if in_backward:
            return out
        grads = [t for t in _tensors(out) if t.requires_grad] if torch.is_grad_enabled() else []
        for t in grads:
            t.register_hook(partial(self._on_grad, slot))
        if not (grads and slot.index == len(self.slots) - 1):  # the last one's backward comes next
            self._park(slot)
        return out

    def _on_grad(self, slot: _Slot, _grad: torch.Tensor) -> None:
        self._backward_window(slot)

    def _backward_window(self, slot: _Slot) -> None:
        """Its backward starts: it is loaded, the block before it starts arriving, the rest leave."""
        self._only({slot.index, slot.index - 1})
        self._load(slot)
        self._prefetch(slot.index - 1)

    # saved tensors

    def _pack(self, outer: Hooks | None, t: torch.Tensor) -> Any:
        address = _storage(t) if self._storages else None
        if address is not None and address in self._storages:
            i, k = self._storages[address]
            if t.dtype == self.slots[i].entries[k].home.dtype:  # the weight or a view of it
                return _SavedWeight(i, k, tuple(t.size()), tuple(t.stride()), t.storage_offset())
        return outer[0](t) if outer else t.detach()

    def _unpack(self, outer: Hooks | None, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _SavedWeight):
            return outer[1](packed) if outer else packed
        slot = self.slots[packed.slot]
        if not slot.loaded:
            self._backward_window(slot)
        e = slot.entries[packed.entry]
        current = e.owner._buffers[e.name] if e.buffer else e.owner._parameters[e.name]
        assert current is not None
        return current.detach().as_strided(packed.size, packed.stride, packed.offset)


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    return []


def start_block_swap(cfg: JobConfig, family: ModelFamily, device: torch.device) -> BlockSwap | None:
    """The stage's block swap (None when ``train.blocks_to_swap`` is 0), hooked and parked on the host."""
    n = cfg.train.blocks_to_swap
    problem = config_problem(cfg, n)
    if problem:
        raise ValueError(problem)
    blocks = swapped_blocks(family, n)
    if not blocks:
        return None
    swap = BlockSwap(blocks, device)
    moved = sum(e.home.numel() * e.home.element_size() for s in swap.slots for e in s.entries)
    logger.info(
        "block swap: the last %d blocks (%.1f MB of frozen weights) take turns in 2 places on the device",
        len(blocks),
        moved / 2**20,
    )
    return swap
