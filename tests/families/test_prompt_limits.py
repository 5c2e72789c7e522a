"""Every family states the prompt length of each text encoder, and that is where its prompts are cut."""

from __future__ import annotations

import pytest
import torch

from eridiffusion.models.prompts import PromptLimits, find_truncations
from tests.families.test_contract import FAMILIES


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_prompt_limits_are_where_prompts_are_cut(name: str) -> None:
    family = FAMILIES[name]()
    for module in family.modules().values():
        module.eval()  # T5's dropout would make two encodings differ
    assert isinstance(family, PromptLimits)
    limits = family.prompt_limits()
    assert limits
    longest = max(limit.max_length for limit in limits)
    base = " ".join(["red"] * longest)  # "red" is one token in every built-in vocabulary
    assert find_truncations(family, ["a red circle"]) == []
    found = find_truncations(family, [base + " circle", "a red circle"])
    assert {t.name for t in found} == {limit.name for limit in limits}
    for t in found:
        assert (t.count, t.total, t.example) == (1, 2, base + " circle")
        assert t.example_tokens > t.limit
        assert f"longer than the {t.limit} tokens of {t.name}" in t.message("captions")
    with torch.no_grad():  # words past every limit change nothing: the encoders really cut there
        a = family.encode_prompt([base + " circle"])
        b = family.encode_prompt([base + " square"])
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], msg=f"{name}: {key} differs")
