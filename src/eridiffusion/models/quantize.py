"""Weight-only quantisation of a frozen base model, so adapters of 12B models train on a 24 GB card.

- ``fp8`` and ``int8``: torchao's weight-only tensors (one byte per weight, a scale per row); matmuls
  dequantise on the fly. peft wraps them with its torchao LoRA layers.
- ``nf4``: bitsandbytes' 4-bit NormalFloat (QLoRA), half a byte per weight plus a scale per 64 weights.

Only the Linear layers inside the model's repeated blocks are quantised (transformer / UNet blocks, the text
encoders' layers): they hold nearly all the weights, while the few input/output projections and embeddings
are the most sensitive to rounding and stay in ``model.dtype``. A layer is quantised on the host, one at a
time, before anything moves to the device, so the device never holds the full-precision model. What is
trained (the adapter) stays full precision, and exported adapter files load on unquantised bases elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

logger = logging.getLogger(__name__)

KINDS = ("fp8", "int8", "nf4")
BLOCK_MARKERS = ("blocks", "mid_block", "layers", "block.")
"""Names of repeated blocks: diffusers' down/up/transformer/single blocks and UNet mid block, CLIP's
``encoder.layers``, T5's ``encoder.block``."""


def quantisable_linears(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, layer) of the plain Linear layers inside repeated blocks (not those quantised already)."""
    return [
        (name, m)
        for name, m in module.named_modules()
        if type(m) is nn.Linear
        and type(m.weight) in (nn.Parameter, torch.Tensor)
        and any(marker in name for marker in BLOCK_MARKERS)
    ]


def _set_child(root: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, child)


def _nf4(layer: nn.Linear) -> nn.Module:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ValueError("model.quantize nf4 needs bitsandbytes: pip install bitsandbytes") from None
    dtype = layer.weight.dtype if layer.weight.dtype != torch.float32 else torch.float32
    q = bnb.nn.Linear4bit(
        layer.in_features,
        layer.out_features,
        bias=layer.bias is not None,
        quant_type="nf4",
        compute_dtype=dtype,
        device="meta",  # its own initial weights would be an fp32 copy of the layer, replaced at once
    )
    q.weight = bnb.nn.Params4bit(layer.weight.data.to(dtype), requires_grad=False, quant_type="nf4")
    if layer.bias is not None:
        q.bias = nn.Parameter(layer.bias.data, requires_grad=False)
    return q.to(layer.weight.device)


def _torchao_config(kind: str) -> object:
    try:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig
    except ImportError:
        raise ValueError(f"model.quantize {kind} needs torchao: pip install torchao") from None
    return Float8WeightOnlyConfig() if kind == "fp8" else Int8WeightOnlyConfig()


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(
            f"model.quantize: {kind!r} is not available; choose one of {', '.join(KINDS)} or none"
        )


def quantize_layer(root: nn.Module, name: str, layer: nn.Linear, kind: str) -> None:
    """Quantise the Linear ``layer`` found at ``name`` in ``root``, in place (nf4 replaces the module)."""
    if kind == "nf4":
        _set_child(root, name, _nf4(layer))
        return
    from torchao.quantization import quantize_

    quantize_(layer, _torchao_config(kind), filter_fn=lambda m, _fqn: isinstance(m, nn.Linear))


def quantize_module(module: nn.Module, kind: str) -> int:
    """Quantise ``module``'s block Linear layers in place, one at a time; returns how many."""
    check_kind(kind)
    layers = quantisable_linears(module)
    for name, layer in layers:
        quantize_layer(module, name, layer, kind)
    return len(layers)


def quantised_layers(module: nn.Module) -> int:
    """How many of ``module``'s layers are stored quantised already (e.g. quantised while loading):
    bitsandbytes' 4-bit layers, and Linear layers whose weight is a torchao tensor subclass."""
    return sum(
        1
        for m in module.modules()
        if type(m).__name__ == "Linear4bit"
        or (type(m) is nn.Linear and type(m.weight) not in (nn.Parameter, torch.Tensor))
    )


def weight_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes of the modules' parameters and buffers as stored (quantised tensors count their payload)."""
    total = 0
    for module in modules:
        for t in (*module.parameters(), *module.buffers()):
            inner = [
                getattr(t, a) for a in ("qdata", "scale", "int_data") if torch.is_tensor(getattr(t, a, None))
            ]
            total += (
                sum(x.numel() * x.element_size() for x in inner) if inner else t.numel() * t.element_size()
            )
    return total
