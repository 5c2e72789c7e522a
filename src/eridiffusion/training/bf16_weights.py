"""Pure-bf16 trained weights (``train.weights_dtype: bf16``): half the memory of fp32 weights and gradients.

A full fine-tune normally keeps fp32 "master" weights and runs the forward in bf16 under autocast: 4 bytes
of weight and 4 of gradient per trained value. Storing the weights themselves in bf16 halves both, but
bf16 keeps 8 significant bits: an update smaller than half a unit in the last place (about 0.4% of the
weight) rounds straight back to the old value, and AdamW's steps at fine-tuning learning rates (1e-5 times
a weight of order 0.05) are mostly that small, so round-to-nearest silently stops training.

:class:`Bf16WeightsOptimizer` wraps any per-parameter optimizer. For a slice of the weights at a time
(:data:`CHUNK_ELEMENTS`), never all of them at once, it widens the bf16 weights and gradients to fp32, lets
the optimizer step on those (its state is fp32, as it is for fp32 weights), and writes the result back to
bf16 by one of three roundings (``train.weights_rounding``):

- ``stochastic`` (the default; Gupta et al. 2015, "Deep learning with limited numerical precision";
  Zamirai et al. 2020, "Revisiting BFloat16 Training"): round up with probability equal to how far the
  value lies towards the next bf16 number, so the rounding is unbiased and small updates land on average.
  It costs no memory: the random bits are drawn per slice from a generator seeded by the run's seed, whose
  state is saved with the optimizer so a resumed run draws the same bits.
- ``kahan``: round to nearest and keep the rounding error in a bf16 compensation buffer added back at the
  next step (compensated summation). Deterministic and low-variance, but the buffer costs 2 bytes per
  value: bf16 weight + buffer is the 4 bytes fp32 weights took, so only the gradients' half is saved.
- ``nearest``: plain round-to-nearest-even, the baseline that loses small updates (for comparison).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from eridiffusion.config.schema import CHUNKED_STEP_REFUSED

CHUNK_ELEMENTS = 2**24
"""Weights stepped together: 16 M values, so 64 MB of fp32 weights and as much gradient in flight at once
(plus the optimizer's own temporaries and the rounding's 6 bytes per value)."""
ROUNDINGS = ("stochastic", "kahan", "nearest")
STATE_KEY = "bf16_weights"
"""The wrapper's own entry in the optimizer's state dict (generator states, Kahan buffers)."""
_LOW_16_BITS = 1 << 16
_HIGH_16_BITS = -65536
"""0xFFFF0000 as an int32: keeps sign, exponent and the 7 mantissa bits bf16 stores."""


def stochastic_round(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``x`` (fp32) rounded to bf16, up or down at random with the probabilities that make it unbiased.

    bf16 is the top 16 bits of an fp32 number, so adding a uniform random integer in [0, 2^16) to the
    number's bits and clearing the low 16 carries into the kept bits with probability (low bits) / 2^16:
    exactly the fraction of the way to the next bf16 value. A value bf16 represents has zero low bits and
    never carries, so it is returned exactly. NaN stays NaN (its payload could otherwise carry into inf).
    """
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round takes fp32 values, got {x.dtype}")
    noise = torch.randint(0, _LOW_16_BITS, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = noise.add_(x.view(torch.int32)).bitwise_and_(_HIGH_16_BITS)
    rounded = bits.view(torch.float32).to(torch.bfloat16)  # exact: the low bits are zero
    return torch.where(torch.isnan(x), x.to(torch.bfloat16), rounded)


def _chunks(params: list[nn.Parameter], limit: int) -> list[list[nn.Parameter]]:
    """``params`` in consecutive slices of at most ``limit`` values (a larger tensor is a slice alone)."""
    out: list[list[nn.Parameter]] = []
    size = limit
    for p in params:
        if size + p.numel() > limit:
            out.append([])
            size = 0
        out[-1].append(p)
        size += p.numel()
    return out


class Bf16WeightsOptimizer(torch.optim.Optimizer):
    """``inner`` stepping bf16 parameters through fp32, one slice at a time, with the chosen rounding.

    It shows ``inner``'s parameter groups and state as its own (the LR schedule sets
    ``param_groups[i]["lr"]`` as for any optimizer); fp32 parameters in the same optimizer are stepped as
    usual. Only per-parameter optimizers can be stepped in slices: one that pools statistics over all
    weights in a step (Prodigy's step-size estimate, schedule-free averaging) is refused
    (``CHUNKED_STEP_REFUSED``).
    """

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        rounding: str,
        seed: int,
        chunk_elements: int = CHUNK_ELEMENTS,
    ) -> None:
        if rounding not in ROUNDINGS:
            raise ValueError(f"train.weights_rounding: {rounding!r} is not one of {', '.join(ROUNDINGS)}")
        # no Optimizer.__init__: the groups, state and defaults are ``inner``'s own (properties below), so
        # an LR set here reaches it, and its load_state_dict (which replaces them) is seen here
        self.inner = inner
        self.rounding = rounding
        self.seed = seed
        self.chunk_elements = chunk_elements
        self._generators: dict[str, torch.Generator] = {}
        self._kahan: dict[nn.Parameter, torch.Tensor] = {}

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @property  # type: ignore[override]
    def state(self) -> dict[Any, dict[str, Any]]:
        return self.inner.state

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self.inner.defaults

    def _params(self) -> list[nn.Parameter]:
        return [p for g in self.param_groups for p in g["params"]]

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device).manual_seed(self.seed)
        return self._generators[key]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("train.weights_dtype bf16: the optimizer step takes no closure")
        params = [p for p in self._params() if p.grad is not None]
        low = [p for p in params if p.dtype == torch.bfloat16]
        wide = [p for p in params if p.dtype != torch.bfloat16]
        if wide:
            self._step_only(wide)
        for chunk in _chunks(low, self.chunk_elements):
            self._step_low(chunk)

    def _step_only(self, chunk: list[nn.Parameter]) -> None:
        """One inner step over ``chunk`` alone (the groups list only its parameters for the call, so the
        optimizer neither visits nor skips the others)."""
        keep = {id(p) for p in chunk}
        saved = [g["params"] for g in self.param_groups]
        for g in self.param_groups:
            g["params"] = [p for p in g["params"] if id(p) in keep]
        try:
            self.inner.step()
        finally:
            for g, ps in zip(self.param_groups, saved, strict=True):
                g["params"] = ps

    def _step_low(self, chunk: list[nn.Parameter]) -> None:
        """Step bf16 ``chunk`` on fp32 copies of its weights and gradients, then round the results back."""
        held = []
        for p in chunk:
            weight, grad = p.data, p.grad
            assert grad is not None
            widened = weight.float()
            if self.rounding == "kahan" and p in self._kahan:
                widened += self._kahan[p]
            p.grad = None
            p.data = widened
            p.grad = grad.float()
            held.append((p, weight, grad))
        stepped = False
        try:
            self._step_only(chunk)
            stepped = True
        finally:  # the bf16 storage comes back either way; it takes the result only of a whole step
            for p, weight, grad in held:
                updated = p.data
                p.grad = None
                p.data = weight
                p.grad = grad
                if stepped:
                    self._write(p, weight, updated)

    def _write(self, p: nn.Parameter, weight: torch.Tensor, updated: torch.Tensor) -> None:
        """Store the fp32 result ``updated`` into the parameter's bf16 storage ``weight``."""
        if self.rounding == "stochastic":
            weight.copy_(stochastic_round(updated, self._generator(updated.device)))
            return
        weight.copy_(updated)  # round to nearest even
        if self.rounding == "kahan":
            if p not in self._kahan:
                self._kahan[p] = torch.zeros_like(weight)
            self._kahan[p].copy_(updated - weight.float())

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        state = self.inner.state_dict()
        index = {id(p): i for i, p in enumerate(self._params())}
        state[STATE_KEY] = {
            "rounding": self.rounding,
            "generators": {k: g.get_state() for k, g in self._generators.items()},
            "kahan": {index[id(p)]: t for p, t in self._kahan.items()},
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        ours = state_dict.pop(STATE_KEY, None)
        if ours is None:
            raise ValueError(
                "the checkpoint's optimizer state was written with fp32 trained weights; resume it with "
                "train.weights_dtype: fp32, or start a new run (save.resume: false)"
            )
        self.inner.load_state_dict(state_dict)
        self._keep_fp32_state(state_dict)
        params = self._params()
        self._generators = {}
        for key, gen_state in ours["generators"].items():
            self._generator(torch.device(key)).set_state(gen_state)
        self._kahan = {
            params[int(i)]: t.to(params[int(i)].device, torch.bfloat16) for i, t in ours["kahan"].items()
        }

    def _keep_fp32_state(self, state_dict: dict[str, Any]) -> None:
        """torch's loader casts every floating-point state tensor to its parameter's dtype, which would
        round the fp32 moments of bf16 parameters to bf16: put the saved fp32 values back."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for i, p in zip(saved_ids, self._params(), strict=True):
            saved = state_dict["state"].get(i)
            if saved is None or p.dtype != torch.bfloat16:
                continue
            for key, value in saved.items():
                if key != "step" and torch.is_tensor(value) and value.is_floating_point():
                    self.state[p][key] = value.to(p.device, copy=True)


def bf16_optimizer(
    optimizer: torch.optim.Optimizer, kind: str, rounding: str, seed: int, where: str
) -> torch.optim.Optimizer:
    """``optimizer`` wrapped to step its bf16 parameters (unchanged when it has none)."""
    if not any(p.dtype == torch.bfloat16 for g in optimizer.param_groups for p in g["params"]):
        return optimizer
    why = CHUNKED_STEP_REFUSED.get(kind)
    if why:
        raise ValueError(f"{where}.type {kind}: {why}")
    return Bf16WeightsOptimizer(optimizer, rounding, seed)
