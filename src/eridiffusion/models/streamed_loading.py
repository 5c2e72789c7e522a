"""Quantise while loading: a frozen base that is to be stored quantised (``model.quantize``,
``model.quantize_text_encoders``) never exists in full precision on the host.

Loading first and quantising after holds the whole model in ``model.dtype`` at the peak (Flux-dev's
transformer alone is 23.8 GB in bf16, so a 24 GB host cannot prepare it). Here the component is built on
the meta device, and its weights are read from the diffusers folder's shards or the single file one tensor
at a time (:mod:`.lazy_weights`; a single file's key conversion runs unchanged on lazy tensors), cast to
``model.dtype`` and assigned; each quantisable Linear (:func:`.quantize.quantisable_linears`) is quantised
the moment its weight and bias are in. So at most one layer (plus, for a fused original-layout tensor such
as Flux's q/k/v/MLP projection, that one tensor) is held unquantised, and the result is the same, tensor for
tensor, as loading in ``model.dtype`` and quantising after. Everything else (the VAE, components not
quantised) loads as it always does.

The families' loaders take part through three calls: :func:`read_single_file` instead of ``load_file``,
:func:`load_pretrained` instead of ``from_pretrained``, and :func:`assign_weights` where a converted state
dict goes into a model built on the meta device. Which components are quantised, and to what, is set for
the duration of one :func:`eridiffusion.models.load_family` by :func:`quantising_loads`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import init_empty_weights
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import load_file
from torch import nn

from eridiffusion.models.lazy_weights import LazyTensor, SafetensorsReader, materialize
from eridiffusion.models.meta import is_weightless
from eridiffusion.models.quantize import check_kind, quantisable_linears, quantize_layer, quantize_module

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=nn.Module)
DENOISER_NAMES = ("transformer", "UNet", "unet")
"""What the loaders call the denoiser when they build it (``instantiate``'s ``what``)."""


@dataclass(frozen=True)
class _Plan:
    dtype: torch.dtype
    kinds: dict[str, str]
    """role ("denoiser" / "text_encoders") -> fp8 / int8 / nf4."""


_PLAN: ContextVar[_Plan | None] = ContextVar("eridiffusion_quantising_loads", default=None)


@contextlib.contextmanager
def quantising_loads(denoiser: str, text_encoders: str, dtype: torch.dtype) -> Iterator[None]:
    """While open (in this thread / task), the loaders quantise the denoiser to ``denoiser`` and the text
    encoders to ``text_encoders`` as they read them ("none": load as usual), storing the rest in ``dtype``."""
    kinds = {r: k for r, k in (("denoiser", denoiser), ("text_encoders", text_encoders)) if k != "none"}
    for kind in kinds.values():
        check_kind(kind)
    if is_weightless():  # planning on the meta device: nothing is read, the estimate models quantisation
        kinds = {}
    token = _PLAN.set(_Plan(dtype, kinds) if kinds else None)
    try:
        yield
    finally:
        _PLAN.reset(token)


def _role(component: str) -> str | None:
    if component in DENOISER_NAMES or component == "denoiser":
        return "denoiser"
    return "text_encoders" if component.startswith("text_encoder") else None


def _kind(component: str) -> str | None:
    plan = _PLAN.get()
    role = _role(component)
    return plan.kinds.get(role) if plan is not None and role is not None else None


def read_single_file(path: Path) -> dict[str, torch.Tensor]:
    """A single file's tensors: read whole as usual, or as lazy tensors (nothing read yet) while a
    component is being quantised, so the conversions run before any weight is read."""
    if _PLAN.get() is None:
        return load_file(str(path))
    return SafetensorsReader([path]).lazy_state()


def assign_weights(model: nn.Module, state: dict[str, torch.Tensor], component: str) -> None:
    """``model.load_state_dict(state, assign=True)`` for a model built on the meta device whose names and
    shapes were already matched, streaming (and quantising) when ``state`` is lazy."""
    if not any(isinstance(t, LazyTensor) for t in state.values()):
        model.load_state_dict(state, strict=True, assign=True)
        return
    plan = _PLAN.get()
    assert plan is not None, "lazy weights come from read_single_file while a plan is set"
    kind = _kind(component)
    n = stream_into(model, state, plan.dtype, kind, component)
    if kind is not None:
        logger.info("%s: %d layers quantised to %s while loading", component, n, kind)


TRIM_EVERY = 8 * 2**20
"""Give freed heap memory back to the system after this many bytes of full-precision weights are quantised."""


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (None elsewhere). glibc keeps freed blocks of up to 32 MB in its heap (its
    mmap threshold grows to the largest block freed), and the bf16 weights freed as each layer is quantised
    end up interleaved with the quantised ones, so without a trim the process's resident size grows to the
    full-precision size after all (measured: +993 MB for a 540 MB bf16 / 277 MB int8 model, +363 MB
    trimming every 8 MB; bench/quantised_loading.py)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


def _owned(t: torch.Tensor) -> torch.Tensor:
    """``t`` in memory of its own (a part of a fused tensor would keep the whole fused tensor alive)."""
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
        return t.clone(memory_format=torch.contiguous_format)
    return t


def stream_into(
    model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, kind: str | None, source: str
) -> int:
    """Assign ``state`` (lazy or not) into ``model`` (parameters on the meta device) one tensor at a time.
    With ``kind``, floating-point tensors are cast to ``dtype`` (as training casts a frozen component before
    quantising it) and each block Linear is quantised as soon as it is complete; without, tensors keep the
    file's dtype and the family's own cast applies after (T5's fp32 ``wo`` under fp16). Tied parameters
    (T5's shared embedding) are read once and stay tied. Returns the number of layers quantised."""
    slots = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, t in slots.items():
        groups.setdefault(id(t), []).append(name)
    pending = {}
    if kind is not None:
        pending = {
            n: {p for p, v in m._parameters.items() if v is not None} for n, m in quantisable_linears(model)
        }
    quantised = freed = 0
    trim = _malloc_trim()
    for names in groups.values():
        key = next((n for n in names if n in state), None)
        if key is None:
            raise ValueError(
                f"{source}: the weights have no {names[0]}; is this the right file for the model?"
            )
        meta = slots[key]
        value = materialize(state[key])
        if kind is not None and value.is_floating_point() and value.dtype != dtype:
            value = value.to(dtype)
        value = _owned(value)
        tensor: torch.Tensor = (
            nn.Parameter(value, requires_grad=meta.requires_grad and value.is_floating_point())
            if isinstance(meta, nn.Parameter)
            else value
        )
        for name in names:
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            if attr in module._parameters:
                module._parameters[attr] = tensor  # type: ignore[assignment]
            else:
                module._buffers[attr] = tensor
            if owner in pending:
                pending[owner].discard(attr)
                if not pending[owner]:
                    del pending[owner]
                    layer = model.get_submodule(owner)
                    freed += sum(p.numel() * p.element_size() for p in layer.parameters())
                    quantize_layer(model, owner, layer, kind)  # type: ignore[arg-type]
                    quantised += 1
        del value, tensor
        if trim is not None and freed >= TRIM_EVERY:
            trim(0)
            freed = 0
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"{source}: {len(left)} weights were not loaded, e.g. {left[:3]}")
    model.eval()
    return quantised


def _is_variant(name: str) -> bool:
    return ".fp16." in name or name.endswith(".fp16.json")


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    """The ``.safetensors`` weight files of a diffusers / transformers component folder (all shards)."""

    def wanted(p: Path) -> bool:
        return _is_variant(p.name) == (variant is not None)

    indexes = [p for p in folder.glob("*.safetensors.index*.json") if wanted(p)]
    if indexes:
        import json

        weight_map = json.loads(indexes[0].read_text(encoding="utf-8")).get("weight_map", {})
        return [folder / name for name in sorted(set(weight_map.values()))]
    return sorted(p for p in folder.glob("*.safetensors") if wanted(p))


def _empty(model_class: type[M], folder: Path) -> M:
    """``model_class`` built from the folder's config, parameters on the meta device (buffers real, since
    non-persistent ones such as rotary tables are not in the weight files)."""
    if issubclass(model_class, ModelMixin):
        config = model_class.load_config(folder)
        with init_empty_weights():
            return model_class.from_config(config)  # type: ignore[no-any-return]
    config_class: Any = model_class.config_class
    config = config_class.from_pretrained(folder)
    with init_empty_weights():
        model = model_class(config)
    model.tie_weights()  # transformers ties shared embeddings (T5's) in from_pretrained, not in __init__
    return model


def load_pretrained(
    model_class: type[M], folder: Path, component: str, dtype: torch.dtype, variant: str | None
) -> M:
    """``model_class.from_pretrained(folder)`` in ``dtype``, streamed and quantised when ``component`` is
    to be quantised."""
    kind = _kind(component)
    dtype_key = "torch_dtype" if issubclass(model_class, ModelMixin) else "dtype"
    if kind is None:
        return model_class.from_pretrained(folder, variant=variant, **{dtype_key: dtype})  # type: ignore[attr-defined,no-any-return]
    files = _weight_files(folder, variant)
    if not files:
        logger.warning(
            "%s: no .safetensors weights to stream, so %s is loaded whole and then quantised (peak host "
            "memory: its full size in %s)",
            folder,
            component,
            dtype,
        )
        model = model_class.from_pretrained(folder, variant=variant, **{dtype_key: dtype})  # type: ignore[attr-defined]
        quantize_module(model, kind)
        return model  # type: ignore[no-any-return]
    model = _empty(model_class, folder)
    reader = SafetensorsReader(files)
    state = reader.lazy_state()
    expected = set(model.state_dict())
    extra = sorted(set(state) - expected)
    if extra:
        logger.warning(
            "%s: %d weights the model does not use were skipped, e.g. %s", folder, len(extra), extra[:3]
        )
    n = stream_into(model, state, dtype, kind, str(folder))
    reader.forget()
    logger.info("%s: %d layers quantised to %s while loading", component, n, kind)
    return model
