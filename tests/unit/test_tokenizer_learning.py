"""A from-scratch tokenizer learns its captions' words; captions of built-in words tokenize as before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from eridiffusion.data.shapes import ShapeSpec, caption_for
from eridiffusion.models import build_family, load_family
from eridiffusion.models.tiny import TinyFamily, TinyOptions
from eridiffusion.models.tokenizer import (
    MIN_TOKENS,
    build_tokenizer,
    choose_max_tokens,
    learn_merges,
    learn_tokenizer,
)
from tests.conftest import TINY_OPTIONS

CAPTIONS = [
    "a watercolor painting of a cat",
    "a watercolor painting of a dog",
    "an oil painting of a horse in a meadow, highly detailed",
    "a charcoal sketch of a lighthouse",
]


def test_caption_words_become_single_tokens_and_captions_stay_apart(tmp_path: Path) -> None:
    builtin = build_tokenizer(tmp_path / "builtin")
    cat, dog = CAPTIONS[:2]
    # the problem being fixed: byte pieces push the last word past the 16 built-in positions
    assert len(builtin(cat).input_ids) > MIN_TOKENS
    cut = builtin([cat, dog], truncation=True, max_length=MIN_TOKENS).input_ids
    assert cut[0] == cut[1]

    learned = learn_tokenizer(tmp_path / "learned", CAPTIONS * 3)
    for caption in CAPTIONS:
        words = caption.replace(",", " ,").split()
        assert learned.tokenize(caption) == [f"{w}</w>" for w in words]
    assert learned(cat).input_ids != learned(dog).input_ids
    assert learned.model_max_length == MIN_TOKENS  # 14 tokens at most: the built-in 16 holds them
    assert learned.unk_token_id not in learned("zebra xylophone!").input_ids[1:-1]  # unseen: pieces


def test_shapes_captions_keep_the_builtin_tokenizer(tmp_path: Path) -> None:
    """The quickstart's captions use only built-in words: the learned tokenizer is the same files."""
    captions = [
        caption_for(ShapeSpec(colour, shape, cx, 0.5, size))
        for colour in ("red", "blue", "black")
        for shape in ("circle", "square", "triangle")
        for cx in (0.2, 0.5, 0.8)
        for size in (0.2, 0.3)
    ]
    learn_tokenizer(tmp_path / "learned", captions)
    build_tokenizer(tmp_path / "builtin")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / "learned" / name).read_bytes() == (tmp_path / "builtin" / name).read_bytes()


def test_learning_is_deterministic_and_the_folder_reloads(tmp_path: Path) -> None:
    a = learn_tokenizer(tmp_path / "a", list(reversed(CAPTIONS)) * 2)
    b = learn_tokenizer(tmp_path / "b", CAPTIONS * 2)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    reloaded = CLIPTokenizer.from_pretrained(tmp_path / "a")
    assert reloaded(CAPTIONS).input_ids == a(CAPTIONS).input_ids == b(CAPTIONS).input_ids


def test_vocabulary_limit_keeps_the_frequent_words(tmp_path: Path) -> None:
    base = len(build_tokenizer(tmp_path / "builtin"))
    captions = ["a meadow"] * 50 + ["a lighthouse"]
    limited = learn_tokenizer(tmp_path / "small", captions, max_vocab=base + 5)
    assert len(limited) <= base + 5
    assert limited.tokenize("meadow") == ["meadow</w>"]
    assert len(limited.tokenize("lighthouse")) > 1


def test_learn_merges_prefers_frequent_pairs_and_breaks_ties_by_order() -> None:
    start = {"ab": ["a", "b</w>"], "cd": ["c", "d</w>"], "abd": ["a", "b", "d</w>"]}
    counts = {"ab": 1, "cd": 5, "abd": 1}
    merges = learn_merges(start, counts, limit=10)  # type: ignore[arg-type]
    assert merges[0] == ("c", "d</w>")
    assert merges[1] == ("a", "b")  # count 2 beats ("a", "b</w>") 1 and ("b", "d</w>") 1
    assert learn_merges(start, counts, limit=1) == [("c", "d</w>")]  # type: ignore[arg-type]


def test_max_tokens_follows_the_captions(tmp_path: Path) -> None:
    tok = learn_tokenizer(tmp_path / "t", ["x"])
    long = " ".join(["word"] * 30)  # 32 ids: learned "word" is one token
    learned = learn_tokenizer(tmp_path / "long", [long] * 10 + ["a cat"] * 2)
    assert learned.model_max_length == 32
    longer = learn_tokenizer(tmp_path / "longer", [long + " word"] * 10)
    assert longer.model_max_length == 40  # 33 rounded up to a multiple of 8
    assert choose_max_tokens(tok, ["a " * 200] * 99 + ["a"]) == 77  # capped at CLIP's 77
    assert choose_max_tokens(tok, []) == MIN_TOKENS
    fixed = learn_tokenizer(tmp_path / "fixed", [long], max_length=20)
    assert fixed.model_max_length == 20


def test_tiny_model_built_from_captions_saves_and_reloads_its_tokenizer(tmp_path: Path) -> None:
    options = {k: v for k, v in TINY_OPTIONS.items() if k != "max_tokens"}
    captions = [*CAPTIONS, "a cat, " * 10]  # 32 tokens with start and end
    family = build_family("tiny", options, seed=0, captions=captions)
    assert isinstance(family, TinyFamily)
    assert family.options.max_tokens == 32
    assert family.text_encoder.config.max_position_embeddings == 32
    assert family.text_encoder.config.vocab_size == len(family.tokenizer)
    family.save_pretrained(tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "eri_family.json").read_text())
    assert saved["options"]["max_tokens"] == 32
    again = load_family(tmp_path / "model")
    assert isinstance(again, TinyFamily)
    assert again.tokenizer(CAPTIONS).input_ids == family.tokenizer(CAPTIONS).input_ids
    assert again.options == family.options


def test_old_option_name_still_loads() -> None:
    """Models saved before ``max_tokens`` stored ``text_max_length``."""
    assert TinyOptions.model_validate({"text_max_length": 12}).max_tokens == 12
    with pytest.raises(ValueError, match="max_tokens"):
        TinyOptions.model_validate({"max_tokens": 2})
