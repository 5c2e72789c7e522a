"""Build small CLIP BPE and T5 unigram tokenizers locally (no hub download).

The vocabulary is CLIP's byte-level alphabet plus whole-word tokens for a word list, with the merges that
assemble each word. Any text still tokenizes (unknown words fall back to byte pieces), and the result is a
genuine ``CLIPTokenizer`` folder that transformers, diffusers and ComfyUI-style tools read as usual.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer, T5Tokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

BASE_WORDS = (
    "a an the of on in at with and or to is photo picture image drawing shape shapes small large big tiny "
    "left right top bottom center centre middle corner background white black gray grey red green blue "
    "yellow purple cyan orange pink brown circle square triangle star cross ring one two three sks"
).split()


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table (printable bytes map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def build_vocab(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """Vocab and merges so each word becomes one ``word</w>`` token, left to right."""
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    for word in sorted(set(words)):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merges.append(f"{left} {right}")
            left += right
            tokens.append(left)
    vocab: dict[str, int] = {}
    for tok in [*tokens, BOS, EOS]:
        vocab.setdefault(tok, len(vocab))
    merges = list(dict.fromkeys(merges))
    return vocab, merges


def build_tokenizer(folder: Path, words: list[str] | None = None, max_length: int = 16) -> CLIPTokenizer:
    """Write vocab.json/merges.txt/tokenizer_config.json into ``folder`` and load them back."""
    vocab, merges = build_vocab(list(words or BASE_WORDS))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": EOS,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return CLIPTokenizer.from_pretrained(folder)


T5_SPECIALS = ("<pad>", "</s>", "<unk>")
"""T5's fixed ids 0, 1, 2 (pad doubles as the decoder start token)."""


def build_t5_tokenizer(folder: Path, words: list[str] | None = None, max_length: int = 256) -> T5Tokenizer:
    """A genuine T5 (SentencePiece-style unigram) tokenizer built locally, saved to ``folder`` and reloaded.

    Pieces are ``▁word`` for each word plus every printable ASCII character, so any ASCII text tokenizes
    (a word outside the list falls back to single characters); ids 0/1/2 are pad/eos/unk as in T5.
    """
    chars = [chr(c) for c in range(33, 127)]
    pieces = [(tok, 0.0) for tok in T5_SPECIALS] + [("▁", -2.0)]
    pieces += [(f"▁{w}", -1.0) for w in sorted(set(words or BASE_WORDS))]
    pieces += [(f"▁{c}", -4.0) for c in chars] + [(c, -5.0) for c in chars]
    tokenizer = T5Tokenizer(vocab=list(dict(pieces).items()), extra_ids=0, model_max_length=max_length)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return T5Tokenizer.from_pretrained(folder)
