"""Build small CLIP BPE and T5 unigram tokenizers locally (no hub download).

The vocabulary is CLIP's byte-level alphabet plus whole-word tokens for a word list, with the merges that
assemble each word. Any text still tokenizes (unknown words fall back to byte pieces), and the result is a
genuine ``CLIPTokenizer`` folder that transformers, diffusers and ComfyUI-style tools read as usual.

A model trained from scratch learns more words from its training captions (:func:`learn_tokenizer`): BPE
merges (Sennrich et al. 2016) continue from the built-in vocabulary until every caption word is one token
or the size limit is reached, so captions the built-in words already cover tokenize exactly as before.
"""

from __future__ import annotations

import heapq
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from transformers import CLIPTokenizer, T5Tokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

BASE_WORDS = (
    "a an the of on in at with and or to is photo picture image drawing shape shapes small large big tiny "
    "left right top bottom center centre middle corner background white black gray grey red green blue "
    "yellow purple cyan orange pink brown circle square triangle star cross ring one two three sks"
).split()

_BASE_SET = frozenset(BASE_WORDS)


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
    return _write_clip_tokenizer(folder, vocab, merges, max_length)


def _write_clip_tokenizer(
    folder: Path, vocab: dict[str, int], merges: list[str], max_length: int
) -> CLIPTokenizer:
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


MIN_TOKENS, MAX_TOKENS, STEP = 16, 77, 8
"""Prompt length chosen from captions: their 99th-percentile length rounded up to a multiple of STEP, never
under the built-in 16 (captions that fit keep the model they always had) nor over CLIP's 77 unless
``max_tokens`` says so."""
DEFAULT_MAX_VOCAB = 8192


def caption_words(tokenizer: CLIPTokenizer, captions: Iterable[str]) -> Counter[str]:
    """The captions' words as this tokenizer splits them (normalised, byte-encoded), with their counts."""
    backend = tokenizer.backend_tokenizer
    counts: Counter[str] = Counter()
    for caption, n in Counter(captions).items():
        text = backend.normalizer.normalize_str(caption) if backend.normalizer else caption
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text):
            counts[piece] += n
    return counts


def learn_merges(start: dict[str, list[str]], counts: Counter[str], limit: int) -> list[tuple[str, str]]:
    """BPE training: repeatedly merge the most frequent adjacent pair (ties: the smallest pair, so the result
    is deterministic) until every word is one symbol or ``limit`` merges were made.

    ``start`` is each word's segmentation under the existing merges; a heap with lazy deletion keeps each
    merge proportional to the words that contain the pair rather than to the whole vocabulary.
    """
    words = list(start)
    seqs = [list(start[w]) for w in words]
    pair_count: Counter[tuple[str, str]] = Counter()
    where: defaultdict[tuple[str, str], set[int]] = defaultdict(set)
    for i, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:], strict=False):
            pair_count[pair] += counts[words[i]]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    done: set[tuple[str, str]] = set()
    while heap and len(merges) < limit:
        negative, pair = heapq.heappop(heap)
        if pair in done or pair_count.get(pair, 0) != -negative or negative == 0:
            continue  # a stale heap entry
        merges.append(pair)
        done.add(pair)
        changed: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair, set())):
            old, weight = seqs[i], counts[words[i]]
            new = _merge_pair(old, pair)
            for p in zip(old, old[1:], strict=False):
                pair_count[p] -= weight
                changed.add(p)
            for p in zip(new, new[1:], strict=False):
                pair_count[p] += weight
                where[p].add(i)
                changed.add(p)
            seqs[i] = new
        for p in changed - done:
            if pair_count[p] > 0:
                heapq.heappush(heap, (-pair_count[p], p))
    return merges


def _merge_pair(seq: list[str], pair: tuple[str, str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(seq[i] + seq[i + 1])
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def choose_max_tokens(tokenizer: CLIPTokenizer, captions: Sequence[str]) -> int:
    """Tokens per prompt (start/end included) for these captions: see :data:`MIN_TOKENS`."""
    counts = Counter(captions)
    if not counts:
        return MIN_TOKENS
    unique = list(counts)
    lengths = sorted(
        (len(ids), counts[c])
        for c, ids in zip(unique, tokenizer(unique, verbose=False).input_ids, strict=True)
    )
    wanted, seen = math.ceil(0.99 * sum(counts.values())), 0
    for length, n in lengths:
        seen += n
        if seen >= wanted:
            return max(MIN_TOKENS, min(MAX_TOKENS, math.ceil(length / STEP) * STEP))
    raise AssertionError("unreachable: the counts sum to the total")


def learn_tokenizer(
    folder: Path, captions: Sequence[str], max_vocab: int = DEFAULT_MAX_VOCAB, max_length: int | None = None
) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` in ``folder`` whose vocabulary is the built-in one plus BPE merges learned from
    ``captions`` (frequent words first; at most ``max_vocab`` tokens in all), and whose maximum length is
    ``max_length`` or :func:`choose_max_tokens`. Unseen words still tokenize, into learned pieces or bytes.
    """
    vocab, merges = build_vocab(list(BASE_WORDS))
    base = _write_clip_tokenizer(folder, vocab, merges, MAX_TOKENS)
    # built-in words keep their built-in pieces (not every one is a single token: "triangle" is three), so
    # captions of built-in words only (the quickstart's shapes) tokenize exactly as they always did
    counts = Counter({w: n for w, n in caption_words(base, captions).items() if w not in _BASE_SET})
    model = base.backend_tokenizer.model
    start = {word: [t.value for t in model.tokenize(word)] for word in sorted(counts)}
    known = set(merges)
    for left, right in learn_merges(start, counts, max(0, max_vocab - len(vocab))):
        if f"{left} {right}" not in known:
            merges.append(f"{left} {right}")
            vocab.setdefault(left + right, len(vocab))
    learned = _write_clip_tokenizer(folder, vocab, merges, MAX_TOKENS)
    return _write_clip_tokenizer(folder, vocab, merges, max_length or choose_max_tokens(learned, captions))


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
