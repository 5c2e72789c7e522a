"""Load a model's structure without its weights, for planning (``eri validate``).

Inside :func:`weightless_loading`, diffusers' and transformers' ``from_pretrained`` build each component
from its ``config.json`` on the meta device instead of reading the weight files, so every family's own
loading code runs unchanged (detection, options, tokenizers, schedulers) and yields a model with the real
shapes, parameter counts and objective, in well under a second at any size. Weights in single-file
checkpoints are still read, as training reads them.

The patch is process-wide while the context is open: use it only in one-shot planning, never while another
thread loads models.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import diffusers
import torch
import transformers
from torch import nn


def _meta_diffusers(cls: type, path: Any, *args: Any, **kwargs: Any) -> nn.Module:
    config = cls.load_config(path, subfolder=kwargs.get("subfolder"))
    with torch.device("meta"):
        model = cls.from_config(config)
    dtype = kwargs.get("torch_dtype")
    if isinstance(dtype, torch.dtype):
        nn.Module.to(model, dtype)  # plain Module.to: no warning about fp32-pinned modules on meta tensors
    return model.eval()


def _meta_transformers(cls: type, path: Any, *args: Any, **kwargs: Any) -> nn.Module:
    config = cls.config_class.from_pretrained(path, subfolder=kwargs.get("subfolder", ""))
    with torch.device("meta"):
        model = cls(config)
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if isinstance(dtype, torch.dtype):
        nn.Module.to(model, dtype)
    return model.eval()


_weightless = 0


def is_weightless() -> bool:
    """Is :func:`weightless_loading` open (so a loader should not read or quantise weights)?"""
    return _weightless > 0


@contextlib.contextmanager
def weightless_loading() -> Iterator[None]:
    """While open, ``from_pretrained`` of diffusers models and transformers models reads configs only."""
    global _weightless
    d_original = diffusers.ModelMixin.__dict__["from_pretrained"]
    t_original = transformers.PreTrainedModel.__dict__["from_pretrained"]
    diffusers.ModelMixin.from_pretrained = classmethod(_meta_diffusers)
    transformers.PreTrainedModel.from_pretrained = classmethod(_meta_transformers)
    _weightless += 1
    try:
        yield
    finally:
        _weightless -= 1
        diffusers.ModelMixin.from_pretrained = d_original
        transformers.PreTrainedModel.from_pretrained = t_original
