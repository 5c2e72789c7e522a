"""Live device bytes of a traced computation, by category, without a device.

:class:`LiveMemory` is a ``TorchDispatchMode``: every tensor an operator returns is counted once per
untyped storage (views and in-place results share their input's storage and add nothing), and uncounted
again when the last reference to that storage goes (a weakref finalizer on the storage object, which
torch keeps alive as long as the storage itself). Under ``FakeTensorMode`` no memory is touched, so a
real-size model's step is traced in seconds on a CPU.

torch's own ``torch.distributed._tools.mem_tracker.MemTracker`` keeps the same books, but also hooks every
module and every parameter (it refuses frozen ones) and copies its whole snapshot on every operator, which
makes a real-size trace take minutes; this tracker only copies its per-category totals when a new peak is
reached. Sizes are rounded up to the CUDA caching allocator's 512-byte blocks, as ``MemTracker`` does.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

WEIGHTS = "weights"
"""Frozen parameters and buffers resident on the device."""
TRAINABLE = "trainable"
GRADS = "grads"
OPTIMIZER = "optimizer"
CACHES = "caches"
"""Batch tensors read from the latent / text-embedding caches, and the cast copies autocast keeps of the
trained (fp32) weights for the length of the autocast region."""
ACTIVATIONS = "activations"
"""Everything else an operator made: activations saved for backward and temporaries."""

CATEGORIES = (WEIGHTS, TRAINABLE, GRADS, OPTIMIZER, CACHES, ACTIVATIONS)
ALLOCATOR_BLOCK = 512
"""The CUDA caching allocator hands out multiples of 512 bytes."""

_TO_COPY = torch.ops.aten._to_copy.default


def storage_key(t: torch.Tensor) -> int:
    """Identity of the storage behind ``t`` (shared by all its views)."""
    return int(t.untyped_storage()._cdata)


class LiveMemory(TorchDispatchMode):
    """Counts live storages by category and records the peak and the split at the peak.

    New tensors made by operators go to :attr:`category` (``activations`` unless changed with
    :meth:`allocating`); :meth:`track` registers tensors made before (parameters, buffers) or moves a counted
    storage to another category (a gradient once accumulated). Casts of the tensors named by
    :meth:`cast_sources` go to ``caches`` (autocast's weight cache).
    """

    def __init__(self, block: int = ALLOCATOR_BLOCK) -> None:
        super().__init__()
        self.block = block
        self.category = ACTIVATIONS
        self.paused = False
        self.current = 0
        self.peak = 0
        self.totals: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
        self.at_peak: dict[str, int] = dict(self.totals)
        self._live: dict[int, list[Any]] = {}
        self._cast_sources: set[int] = set()

    # bookkeeping ------------------------------------------------------------------------------------------
    def _rounded(self, nbytes: int) -> int:
        return -(-nbytes // self.block) * self.block if self.block > 1 else nbytes

    def _add(self, t: torch.Tensor, category: str, nbytes: int | None = None) -> None:
        storage = t.untyped_storage()
        key = int(storage._cdata)
        if key in self._live:
            return
        size = self._rounded(storage.nbytes() if nbytes is None else nbytes)
        self._live[key] = [category, size]
        self.totals[category] += size
        self.current += size
        finalizer = weakref.finalize(storage, self._free, key)
        finalizer.atexit = False
        if self.current > self.peak:
            self.peak = self.current
            self.at_peak = dict(self.totals)

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.totals[entry[0]] -= entry[1]
            self.current -= entry[1]

    def track(self, t: torch.Tensor, category: str, nbytes: int | None = None) -> None:
        """Count ``t``'s storage under ``category`` (``nbytes`` instead of its own size, e.g. a quantised
        weight's), or move it there if it is counted already."""
        entry = self._live.get(storage_key(t))
        if entry is None:
            self._add(t, category, nbytes)
        elif entry[0] != category:
            self.totals[entry[0]] -= entry[1]
            self.totals[category] += entry[1]
            entry[0] = category

    def add_constant(self, category: str, nbytes: int) -> None:
        """Bytes the trace cannot see (an 8-bit optimizer's state, a block-swap buffer): counted as live
        from now on, and part of every later peak."""
        self.totals[category] += nbytes
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current
            self.at_peak = dict(self.totals)

    def cast_sources(self, tensors: Iterable[torch.Tensor]) -> None:
        self._cast_sources = {storage_key(t) for t in tensors}

    def reset_peak(self) -> None:
        self.peak = self.current
        self.at_peak = dict(self.totals)

    @contextlib.contextmanager
    def allocating(self, category: str) -> Iterator[None]:
        """New tensors of the block go to ``category``."""
        before, self.category = self.category, category
        try:
            yield
        finally:
            self.category = before

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Operators of the block are not counted (work that happens off the device, or before training)."""
        before, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = before

    # the dispatch hook ------------------------------------------------------------------------------------
    def __torch_dispatch__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        category = self.category
        if (
            func is _TO_COPY
            and self._cast_sources
            and isinstance(args[0], torch.Tensor)
            and storage_key(args[0]) in self._cast_sources
        ):
            category = CACHES
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t, category)
        return out


def frozen_safe_memtracker() -> Any:
    """torch's ``MemTracker`` (the reference this tracker is checked against) for models with frozen
    parameters: it hooks the gradient of every parameter of a module it enters, which fails on frozen ones,
    so the hooks are only installed on modules whose parameters all train. Its totals do not depend on the
    hooks (gradients are counted as operator outputs either way); only its gradient category does."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class FrozenSafeMemTracker(MemTracker):
        def _track_module_params_and_buffers(
            self, module: torch.nn.Module, install_grad_hooks: bool = True
        ) -> tuple[int, int]:
            hooks = install_grad_hooks and all(p.requires_grad for p in module.parameters())
            return super()._track_module_params_and_buffers(module, install_grad_hooks=hooks)

    return FrozenSafeMemTracker()


def memtracker_peak(tracker: Any) -> int:
    """The peak total bytes a ``MemTracker`` saw, over its devices."""
    return int(sum(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values()))
