"""Prompt length limits of every family's text encoders, and which texts exceed them.

Every encoder cuts prompts at a fixed number of tokens (CLIP 77, T5 as configured, the tiny family as built).
Cutting is necessary, but it must never be silent: a model trained on captions whose distinguishing words
fall past the limit cannot learn them, and a user whose prompt is cut should know why it was ignored. The
data scan, ``eri validate``, ``eri generate`` and the server report through :func:`find_truncations`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class PromptLimit:
    """One tokenizer and the number of ids (special tokens included) its encoder reads."""

    name: str
    """The tokenizer's folder name in a saved model (``tokenizer``, ``tokenizer_2``, ``tokenizer_3``)."""
    tokenizer: PreTrainedTokenizerBase
    max_length: int


@runtime_checkable
class PromptLimits(Protocol):
    """Families whose prompts go through tokenizers with a length limit (all built-in ones)."""

    def prompt_limits(self) -> list[PromptLimit]: ...


@dataclass(frozen=True)
class Truncation:
    """How many of the texts one tokenizer cuts, with the longest as the example."""

    name: str
    limit: int
    count: int
    total: int
    example: str
    example_tokens: int

    def message(self, what: str) -> str:
        return (
            f"{self.count} of {self.total} {what} are longer than the {self.limit} tokens of {self.name} and "
            f"are cut there (words after it are ignored); e.g. {self.example!r} has {self.example_tokens} "
            "tokens. Shorten them (or, for a model built from scratch, raise model.options.max_tokens)"
        )


def token_counts(limit: PromptLimit, texts: list[str]) -> list[int]:
    """Ids per text as the encoder would see them untruncated (start/end tokens included)."""
    return [len(ids) for ids in limit.tokenizer(texts, verbose=False).input_ids]


def find_truncations(family: object, texts: Iterable[str]) -> list[Truncation]:
    """One entry per tokenizer of ``family`` that would cut some of ``texts`` (empty: nothing is cut)."""
    if not isinstance(family, PromptLimits):
        return []
    unique = sorted(set(texts))
    found: list[Truncation] = []
    if not unique:
        return found
    for limit in family.prompt_limits():
        counts = token_counts(limit, unique)
        over = [(n, text) for n, text in zip(counts, unique, strict=True) if n > limit.max_length]
        if over:
            n, text = max(over)
            found.append(Truncation(limit.name, limit.max_length, len(over), len(unique), text, n))
    return found
