"""Caption transforms: trigger words and tag shuffling, as kohya / ai-toolkit users expect them.

Trigger word (ai-toolkit semantics): ``[trigger]`` (and ai-toolkit's alias ``[name]``) is replaced by the
dataset's ``trigger_word``; when the word does not occur in the caption at all it is prepended. We prepend
it as the first comma-separated tag (``"ohwx, a photo of a dog"``; ai-toolkit joins with a space) so that
``keep_tokens: 1`` keeps it in front when tags are shuffled. Without a trigger word the placeholders are
removed, as in ai-toolkit, rather than trained on literally.

Tag shuffling (kohya's ``shuffle_caption`` / ``keep_tokens``): a caption is split on commas, the first
``keep_tokens`` tags stay in place and the rest are permuted, so the model does not learn tag order.
"""

from __future__ import annotations

import re

import numpy as np

PLACEHOLDERS = ("[trigger]", "[name]")
_SPACES = re.compile(r"\s+")
_EMPTY_TAGS = re.compile(r"(?:\s*,\s*)+,")


def _tidy(caption: str) -> str:
    """Collapse whitespace and the empty tags a removed placeholder leaves ('a, , b' -> 'a, b')."""
    caption = _SPACES.sub(" ", caption).strip()
    caption = _EMPTY_TAGS.sub(",", caption)
    return caption.strip(" ,")


def apply_trigger(caption: str, trigger_word: str | None) -> str:
    """Replace the placeholders with the trigger word; prepend it as a tag if it is still absent."""
    replacement = (trigger_word or "").strip()
    has_placeholder = any(p in caption for p in PLACEHOLDERS)
    for placeholder in PLACEHOLDERS:
        caption = caption.replace(placeholder, replacement)
    if has_placeholder:
        caption = _tidy(caption)
    if replacement and replacement not in caption:
        caption = f"{replacement}, {caption}" if caption.strip() else replacement
    return caption


def split_tags(caption: str) -> list[str]:
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def shuffle_tags(caption: str, keep_tokens: int, rng: np.random.Generator) -> str:
    """Permute the comma-separated tags after the first ``keep_tokens``; rejoined with ', '."""
    tags = split_tags(caption)
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    if len(tail) < 2:
        return ", ".join(tags)
    return ", ".join(head + [tail[i] for i in rng.permutation(len(tail))])
