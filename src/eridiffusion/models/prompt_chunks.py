"""Prompts longer than CLIP's window, the way AUTOMATIC1111 reads them (opt-in, SD1.5/SDXL).

CLIP reads 77 ids: a start token, 75 tokens of text and an end token. A1111 splits a longer prompt into
chunks of 75 tokens, wraps and pads each to 77 ids like a prompt of its own, encodes the chunks separately
and concatenates their hidden states along the sequence (the UNet's cross-attention takes any length); the
pooled output (SDXL) is the first chunk's. Every prompt of a batch gets the same number of chunks (empty
ones pad the shorter), so a prompt and its negative can be stacked for classifier-free guidance. A prompt of
at most 75 tokens is one chunk with exactly the ids of the ordinary, truncating encoding.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import torch
from transformers import PreTrainedTokenizerBase


@runtime_checkable
class ChunkedPrompts(Protocol):
    """Families that can encode long prompts in chunks (SD1.5, SDXL)."""

    def chunked_prompts(self) -> AbstractContextManager[None]:
        """While active, ``encode_prompt`` chunks long prompts instead of cutting them."""
        ...


def text_ids(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[list[int]]:
    """Each prompt's ids without start/end tokens and without truncation."""
    return tokenizer(prompts, add_special_tokens=False, verbose=False).input_ids


def chunk_count(tokenizer: PreTrainedTokenizerBase, prompts: list[str], length: int) -> int:
    """Chunks the longest prompt needs in a window of ``length`` ids (at least one)."""
    longest = max((len(ids) for ids in text_ids(tokenizer, prompts)), default=0)
    return max(1, math.ceil(longest / (length - 2)))


def chunked_ids(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], length: int, chunks: int
) -> torch.Tensor:
    """(len(prompts) * chunks, length) ids: chunk j of prompt i at row i * chunks + j, each chunk
    ``start + text + end`` padded with the tokenizer's pad id like a prompt of its own."""
    width = length - 2
    rows = []
    for ids in text_ids(tokenizer, prompts):
        for j in range(chunks):
            part = [tokenizer.bos_token_id, *ids[j * width : (j + 1) * width], tokenizer.eos_token_id]
            rows.append(part + [tokenizer.pad_token_id] * (length - len(part)))
    return torch.tensor(rows, dtype=torch.long)


def join_chunks(hidden: torch.Tensor, batch: int) -> torch.Tensor:
    """(batch * chunks, length, dim) -> (batch, chunks * length, dim); the identity for one chunk."""
    return hidden.reshape(batch, -1, hidden.shape[-1])


def first_chunk(pooled: torch.Tensor, batch: int) -> torch.Tensor:
    """(batch * chunks, dim) -> (batch, dim): the pooled output of each prompt's first chunk."""
    return pooled.reshape(batch, -1, pooled.shape[-1])[:, 0]
