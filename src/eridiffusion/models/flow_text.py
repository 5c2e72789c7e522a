"""The text encoders of the flow-matching families: CLIP (penultimate hidden states and pooled output) and
T5, each described by an :class:`EncoderSlot` (its module name, presets, tokenizer and original-file prefix),
built locally for random-init models, loaded with their tokenizers, and mapped to and from original keys."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedTokenizerBase,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from eridiffusion.models.protocol import module_device
from eridiffusion.models.stable_diffusion import match_text_keys
from eridiffusion.models.token_ids import token_ids
from eridiffusion.models.tokenizer import build_t5_tokenizer, build_tokenizer

logger = logging.getLogger(__name__)

TextModel = CLIPTextModel | CLIPTextModelWithProjection | T5EncoderModel


@dataclass(frozen=True)
class EncoderSlot:
    """One text encoder of a family and every place it can come from."""

    module: str
    """Component name in a diffusers folder and in :meth:`FlowTransformerFamily.modules`."""
    tokenizer: str
    kind: Literal["clip", "t5"]
    model_class: type[TextModel]
    override: Literal["clip_l_path", "clip_g_path", "t5_path"]
    """The ``model.*`` key that replaces this encoder (and its tokenizer)."""
    original_prefix: str
    """Key prefix in an original single file (``text_encoders.clip_l.transformer.``)."""
    kohya_prefix: str
    """Adapter key prefix (kohya/ComfyUI: ``lora_te1`` CLIP-L, ``lora_te2`` CLIP-G, ``lora_te3`` T5)."""
    trainable: bool
    """Part of a full fine-tune with ``train_text_encoder`` (the CLIPs; T5-XXL stays frozen)."""


def build_text_model(slot: EncoderSlot, config: dict[str, Any]) -> TextModel:
    clean = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "_class_name")}
    if slot.kind == "t5":
        return T5EncoderModel(T5Config.from_dict(clean))
    return slot.model_class(CLIPTextConfig.from_dict(clean))


def local_tokenizer(slot: EncoderSlot, encoder: TextModel, t5_max_length: int) -> PreTrainedTokenizerBase:
    """The locally built tokenizer of this slot (real vocabularies cannot be downloaded here)."""
    with tempfile.TemporaryDirectory() as tmp:
        if slot.kind == "t5":
            tok: PreTrainedTokenizerBase = build_t5_tokenizer(Path(tmp) / "t5", max_length=t5_max_length)
        else:
            tok = build_tokenizer(Path(tmp) / "clip", max_length=encoder.config.max_position_embeddings)
    if len(tok) > encoder.config.vocab_size:
        raise ValueError(f"{slot.module} vocab_size {encoder.config.vocab_size} < tokenizer size {len(tok)}")
    return tok


def fallback_tokenizer(
    source: Path, slot: EncoderSlot, encoder: TextModel, t5_max_length: int
) -> PreTrainedTokenizerBase:
    logger.warning(
        "%s: no tokenizer files for %s, so it uses a small %s vocabulary built locally that does NOT match "
        "the original tokenizer: the model will not follow prompts as it was trained to. Fix: set model.%s "
        "to a local folder with this text encoder and its tokenizer (e.g. the %s/ and %s/ folders of the "
        "diffusers release of this model).",
        source,
        slot.module,
        slot.kind.upper(),
        slot.override,
        slot.module,
        slot.tokenizer,
    )
    return local_tokenizer(slot, encoder, t5_max_length)


def has_tokenizer_files(folder: Path, kind: str) -> bool:
    """Whether ``folder`` holds a tokenizer of this kind (CLIP's BPE files or T5's SentencePiece); where none
    does, the loaders fall back to :func:`fallback_tokenizer`."""
    names = ("vocab.json", "tokenizer.json") if kind == "clip" else ("tokenizer.json", "spiece.model")
    return any((folder / n).is_file() for n in names)


def load_tokenizer(folder: Path, slot: EncoderSlot) -> PreTrainedTokenizerBase:
    return (CLIPTokenizer if slot.kind == "clip" else T5Tokenizer).from_pretrained(folder)


def clip_embeddings(
    encoder: CLIPTextModel | CLIPTextModelWithProjection,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden states, pooled output) of a CLIP text encoder; the pooled output is the
    projected ``text_embeds`` for ``CLIPTextModelWithProjection`` (SD3) and ``pooler_output`` otherwise
    (Flux), as diffusers' pipelines use them."""
    ids = token_ids(tokenizer, prompts, encoder.config.max_position_embeddings).to(module_device(encoder))
    out = encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], out[0] if isinstance(
        encoder, CLIPTextModelWithProjection
    ) else out.pooler_output


def t5_embeddings(
    encoder: T5EncoderModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int
) -> torch.Tensor:
    ids = token_ids(tokenizer, prompts, max_length).to(module_device(encoder))
    return encoder(ids)[0]


def t5_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A T5 encoder state dict with the tied ``shared`` / ``encoder.embed_tokens`` pair complete
    (original files usually keep only one of the two names)."""
    out = {k: v for k, v in state.items() if not k.startswith("decoder.")}
    if "shared.weight" not in out and "encoder.embed_tokens.weight" in out:
        out["shared.weight"] = out["encoder.embed_tokens.weight"]
    if "encoder.embed_tokens.weight" not in out and "shared.weight" in out:
        out["encoder.embed_tokens.weight"] = out["shared.weight"]
    return out


def text_keys(slot: EncoderSlot, state: dict[str, torch.Tensor], model: TextModel) -> dict[str, torch.Tensor]:
    """Weights of one encoder (original prefix stripped) in the names ``model`` expects."""
    flat = {k.removeprefix(slot.original_prefix): v for k, v in state.items()}
    if slot.kind == "t5":
        return t5_keys(flat)
    out = match_text_keys(flat, model)
    if isinstance(model, CLIPTextModelWithProjection) and "text_projection.weight" not in out:
        # SD3's CLIP-L pooled output is used unprojected: its single files carry no projection (diffusers
        # inserts the identity for the same reason)
        out["text_projection.weight"] = torch.eye(model.config.hidden_size, model.config.projection_dim).T
    return out


def text_to_original(slot: EncoderSlot, model: TextModel) -> dict[str, torch.Tensor]:
    """A text encoder under its original single-file prefix (``text_model.*`` CLIP names, T5 as is)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.endswith("position_ids") or key == "encoder.embed_tokens.weight":
            continue
        if slot.kind == "clip" and not key.startswith(("text_model.", "text_projection")):
            key = f"text_model.{key}"
        out[slot.original_prefix + key] = value
    return out
