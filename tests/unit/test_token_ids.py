"""The per-tokenizer token-id memo gives exactly what the tokenizer gives, batch by batch."""

from __future__ import annotations

from pathlib import Path

import torch

from eridiffusion.models.token_ids import token_ids
from eridiffusion.models.tokenizer import build_tokenizer


def test_memoised_ids_equal_the_tokenizers_for_any_batch(tmp_path: Path) -> None:
    tok = build_tokenizer(tmp_path / "tok", max_length=16)
    prompts = ["a red circle", "", "a very long prompt " * 10, "a red circle", "a blue square"]
    direct = tok(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(token_ids(tok, prompts, 16), direct)
    assert torch.equal(token_ids(tok, prompts[::-1], 16), direct.flip(0))  # now from the memo
    other = tok(prompts, padding="max_length", max_length=8, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(token_ids(tok, prompts, 8), other)  # the length is part of the key
