"""The engine under the training loop: accelerate owns processes, devices and mixed precision.

One process or many (``eri train --num-processes N``, ``accelerate launch``, ``torchrun``), the loop calls
the same methods. With several processes:

- **ddp**: every process holds the whole model; after the last micro-batch of a step the gradients of the
  trained parameters (and the step's scalars) are averaged across processes in bucketed all-reduces, which is
  DDP's arithmetic (gradients synchronised once per accumulation window, as DDP with ``no_sync``). Doing it on
  the parameter lists rather than through a ``DistributedDataParallel`` wrapper works the same for every stage
  kind (a LoRA spread over UNet and text encoder, an autoencoder and its discriminator) and leaves the model
  objects the families, EMA and exporters know untouched.
- **fsdp**: torch's ``fully_shard`` (FSDP2) shards each trained module's blocks in place; gradients are
  reduce-scattered by FSDP itself, and checkpoints gather full weights on the main process.

Each process trains on its rows of every micro-batch (:meth:`Batch.share`), so N processes with batch b
train exactly as one process with batch N x b.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from eridiffusion.config.schema import TrainConfig
from eridiffusion.data.loader import Batch
from eridiffusion.device import resolve_device

logger = logging.getLogger(__name__)

BUCKET_ELEMENTS = 25_000_000
"""Gradient elements per all-reduce (about 100 MB in fp32), DDP's default bucket size."""


def resolve_precision(setting: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype or None for full fp32. ``auto`` picks bf16 only where it is fast and safe."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[setting]


def launched_world_size() -> int:
    """Processes of this run as set by the launcher (torchrun / accelerate launch); 1 when not launched."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Engine:
    """Devices, precision and the collectives of one training process."""

    device: torch.device
    amp_dtype: torch.dtype | None
    rank: int = 0
    world: int = 1
    strategy: str = "single"
    """single, ddp or fsdp."""
    scaler: torch.amp.GradScaler | None = None
    accelerator: Any = None
    parts: int = 1
    """Pieces each micro-batch is split into after an out-of-memory step (see optimizer_step)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # precision --------------------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        if self.scaler is not None:
            for opt in optimizers:
                self.scaler.unscale_(opt)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(optimizer)
        else:
            optimizer.step()

    def update_scaler(self) -> None:
        if self.scaler is not None:
            self.scaler.update()

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=self.device.type == "cuda" or None)
        full = getattr(norm, "full_tensor", None)  # a DTensor under FSDP: the norm of all shards
        return (full() if full is not None else norm).float()

    # processes --------------------------------------------------------------------------------------------
    def share(self, batch: Batch) -> Batch:
        return batch if self.world == 1 else batch.share(self.rank, self.world)

    def sync_gradients(self, params: list[nn.Parameter], scalars: torch.Tensor) -> torch.Tensor:
        """Average the gradients of ``params`` (ddp) and ``scalars`` (always) over processes."""
        if self.world == 1:
            return scalars
        if self.strategy == "fsdp":  # FSDP reduce-scattered the gradients during backward
            dist.all_reduce(scalars)
            return scalars / self.world
        # a parameter no process reached keeps grad None (the optimizer skips it, as in one process); one
        # reached by some processes only gets zeros from the others. The first bucket carries, beside the
        # scalars, one flag per parameter saying whether this process has its gradient.
        reached = torch.tensor(
            [p.grad is not None for p in params], dtype=torch.float32, device=scalars.device
        )
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        head = [scalars, reached]
        buckets: list[list[nn.Parameter]] = [[]]
        size = scalars.numel() + reached.numel()
        for p in params:
            if size >= BUCKET_ELEMENTS and buckets[-1]:
                buckets.append([])
                size = 0
            buckets[-1].append(p)
            size += p.numel()
        for i, bucket in enumerate(buckets):
            parts = ([t.reshape(-1).float() for t in head] if i == 0 else []) + [
                p.grad.reshape(-1).float() for p in bucket
            ]
            buffer = torch.cat(parts)
            dist.all_reduce(buffer)
            buffer /= self.world
            offset = 0
            if i == 0:
                scalars = buffer[: scalars.numel()].clone()
                reached = buffer[scalars.numel() : scalars.numel() + reached.numel()].clone()
                offset = scalars.numel() + reached.numel()
            for p in bucket:
                p.grad.copy_(buffer[offset : offset + p.numel()].view_as(p.grad))
                offset += p.numel()
        for p, flag in zip(params, reached.tolist(), strict=True):
            if flag == 0:
                p.grad = None
        return scalars

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block first (building caches, generating data, tidying the run folder),
        the others after it, so they find its results instead of racing it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def broadcast(self, value: Any) -> Any:
        """The main process's ``value`` on every process (a decision only it may take)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # checkpoints (FSDP shards are gathered into whole tensors, and split again on load) ---------------------
    def full_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """The whole tensor of a (possibly sharded) parameter; a collective under FSDP."""
        full = getattr(t, "full_tensor", None)
        return full() if full is not None else t

    def optimizer_state(self, optimizers: Any) -> dict[str, Any]:
        """The optimizers' state dict with every sharded state tensor gathered (same order on every
        process, so the collectives line up)."""
        return _map_tensors(optimizers.state_dict(), self.full_tensor)

    def load_into(self, p: torch.Tensor, value: torch.Tensor) -> None:
        """Copy a whole tensor into a parameter, keeping only this process's shard of it under FSDP."""
        mesh = getattr(p, "device_mesh", None)
        if mesh is not None:
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value.to(p.device, p.dtype), mesh, p.placements)
        p.copy_(value.to(p.dtype))

    def load_optimizer_state(self, optimizers: Any, state: dict[str, Any]) -> None:
        optimizers.load_state_dict(state)
        if self.strategy != "fsdp":
            return
        from torch.distributed.tensor import distribute_tensor

        for opt in optimizers.optimizers.values():
            for p, st in opt.state.items():
                mesh = getattr(p, "device_mesh", None)
                for k, v in list(st.items()):
                    if mesh is not None and torch.is_tensor(v) and v.shape == p.shape:
                        st[k] = distribute_tensor(v.to(p.device), mesh, p.placements)

    @contextlib.contextmanager
    def gathered(self, modules: Iterable[nn.Module]) -> Iterator[None]:
        """Under FSDP, the modules hold their whole weights for the block (every process gathers them; no
        forward may run inside): what ``save_pretrained`` needs to write a whole model."""
        if self.strategy != "fsdp":
            yield
            return
        swapped = []
        with torch.no_grad():
            for module in modules:
                for sub in module.modules():
                    for name, p in list(sub._parameters.items()):
                        if p is not None and hasattr(p, "full_tensor"):
                            sub._parameters[name] = nn.Parameter(p.full_tensor(), requires_grad=False)
                            swapped.append((sub, name, p))
        try:
            yield
        finally:
            for sub, name, p in swapped:
                sub._parameters[name] = p

    # sharding ---------------------------------------------------------------------------------------------
    def shard(self, module: nn.Module, reshard_after_forward: bool) -> None:
        """FSDP2 in place: each block of the module's top-level block lists (UNet down/up blocks, transformer
        blocks: the unit whose weights are gathered together), then the module itself for the rest."""
        from torch.distributed.fsdp import fully_shard

        for child in module.children():
            if isinstance(child, nn.ModuleList):
                for block in child:
                    if next(block.parameters(), None) is not None:
                        fully_shard(block, reshard_after_forward=reshard_after_forward)
        fully_shard(module, reshard_after_forward=reshard_after_forward)


def _map_tensors(obj: Any, fn: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    return obj


def create_engine(train: TrainConfig) -> Engine:
    """The engine for this process: accelerate's state (set by ``accelerate launch``/``torchrun`` when there
    are several processes), the device and the autocast dtype of ``train.mixed_precision``."""
    from accelerate import Accelerator, DistributedType
    from accelerate.state import AcceleratorState

    world = launched_world_size()
    wanted = resolve_device(train.device, "train.device")
    amp = resolve_precision(train.mixed_precision, wanted)
    if train.weights_dtype == "bf16":  # bf16 trained weights compute in bf16 on any device (CPU too)
        amp = torch.bfloat16
    mixed = {None: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]
    # a process may run several jobs (tests, a pipeline's fresh state): accelerate's state is process-wide
    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=wanted.type == "cpu", mixed_precision=mixed)
    if world > 1 and accelerator.num_processes != world:
        raise RuntimeError(f"launched with {world} processes but accelerate sees {accelerator.num_processes}")
    device = wanted if world == 1 else accelerator.device
    strategy = "single"
    if world > 1:
        fsdp = accelerator.distributed_type == DistributedType.FSDP
        strategy = "fsdp" if fsdp or train.distributed.strategy == "fsdp" else "ddp"
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 and device.type == "cuda" else None
    return Engine(
        device=device,
        amp_dtype=amp,
        rank=accelerator.process_index,
        world=world,
        strategy=strategy,
        scaler=scaler,
        accelerator=accelerator,
    )
