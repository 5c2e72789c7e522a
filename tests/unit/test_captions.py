"""Trigger words and tag shuffling behave as ai-toolkit / kohya users expect."""

from __future__ import annotations

import numpy as np
import pytest

from eridiffusion.data.captions import apply_trigger, shuffle_tags


@pytest.mark.parametrize(
    ("caption", "trigger", "expected"),
    [
        ("a photo of [trigger] on a beach", "ohwx", "a photo of ohwx on a beach"),
        ("[name], smiling", "ohwx", "ohwx, smiling"),
        ("a dog, grass", "ohwx", "ohwx, a dog, grass"),  # absent: prepended as the first tag
        ("ohwx dog", "ohwx", "ohwx dog"),  # already present: untouched
        ("", "ohwx", "ohwx"),  # missing caption: the trigger alone
        ("[trigger], red, blue", None, "red, blue"),  # no trigger word: placeholder removed
        ("red,  [trigger] , blue", None, "red, blue"),
        ("plain  caption", None, "plain  caption"),  # untouched without placeholders
    ],
)
def test_apply_trigger(caption: str, trigger: str | None, expected: str) -> None:
    assert apply_trigger(caption, trigger) == expected


def test_shuffle_keeps_leading_tags_and_is_seeded() -> None:
    caption = "ohwx, man, beard, glasses, hat, smiling, outdoors"
    results = {shuffle_tags(caption, 2, np.random.default_rng(seed)) for seed in range(20)}
    assert len(results) > 5
    for result in results:
        tags = result.split(", ")
        assert tags[:2] == ["ohwx", "man"] and sorted(tags) == sorted(caption.split(", "))
    assert shuffle_tags(caption, 2, np.random.default_rng(3)) == shuffle_tags(
        caption, 2, np.random.default_rng(3)
    )
    assert shuffle_tags("a, b", 5, np.random.default_rng(0)) == "a, b"
