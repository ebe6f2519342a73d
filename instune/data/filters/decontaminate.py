"""Eval-set decontamination: drop training records that share a word n-gram with any eval text.

GPT-3 (Brown et al. 2020) used 13-grams over lower-cased words. The n-gram hashes are deterministic
(crc32 per word, mixed in numpy), so an index built in the driver matches hashes computed in any worker;
Python's `hash()` is salted per process and would not.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

from instune.data.schema import record_text

_WORD = re.compile(r"\w+")
_MASK64 = (1 << 64) - 1
# One odd 64-bit multiplier per position in the n-gram, so "a b" and "b a" hash differently.
_POSITION_MULTIPLIERS = np.random.default_rng(20240601).integers(1, 2**63, size=64, dtype=np.uint64) * 2 + 1


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, underscore); punctuation and spacing are ignored."""
    return _WORD.findall(text.lower())


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads every input bit over the whole 64-bit output."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


# Word -> hash, kept across calls in a worker: text is Zipfian, so most words of a batch were hashed before
# and a dict lookup (C-level map) replaces an encode, a crc32 and a Python generator step per word.
_WORD_HASHES: dict[str, int] = {}
_WORD_HASHES_MAX = 1 << 20


def word_hashes(tokens: list[str]) -> np.ndarray:
    """A deterministic uint64 hash per token."""
    new = [t for t in set(tokens) if t not in _WORD_HASHES]
    if new:
        if len(_WORD_HASHES) + len(new) > _WORD_HASHES_MAX:
            _WORD_HASHES.clear()
            new = list(set(tokens))
        crcs = np.fromiter((zlib.crc32(t.encode("utf-8")) for t in new), dtype=np.uint64, count=len(new))
        _WORD_HASHES.update(zip(new, mix64(crcs).tolist()))
    return np.fromiter(map(_WORD_HASHES.__getitem__, tokens), dtype=np.uint64, count=len(tokens))


def ngram_hashes(tokens: list[str], n: int) -> np.ndarray:
    """uint64 hashes of every word n-gram; a text shorter than n words gives one hash of all its words."""
    if not tokens:
        return np.zeros(0, dtype=np.uint64)
    assert n <= len(_POSITION_MULTIPLIERS), f"n-gram size {n} is above {len(_POSITION_MULTIPLIERS)}"
    hashes = word_hashes(tokens)
    width = min(n, len(hashes))
    count = len(hashes) - width + 1
    combined = np.zeros(count, dtype=np.uint64)
    for i in range(width):
        combined += hashes[i : i + count] * _POSITION_MULTIPLIERS[i]
    # The width enters the hash so a short text never equals a full-width n-gram by accident.
    return mix64(combined + np.uint64(width))


def batch_ngram_hashes(token_lists: list[list[str]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(every text's `ngram_hashes`, concatenated; the count per text): the same values, computed for the
    whole batch in one pass, so the cost per text is not a dozen small numpy calls."""
    assert n <= len(_POSITION_MULTIPLIERS), f"n-gram size {n} is above {len(_POSITION_MULTIPLIERS)}"
    lengths = np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))
    counts = np.where(lengths >= n, lengths - n + 1, np.minimum(lengths, 1))
    if not lengths.sum():
        return np.zeros(0, dtype=np.uint64), counts
    hashes = word_hashes([t for tokens in token_lists for t in tokens])
    # Windows over the concatenated words; a window is kept when it starts n - 1 or more words before the end
    # of its own text. Texts shorter than n (one hash of all their words) are done one by one below.
    count = max(len(hashes) - n + 1, 0)
    combined = np.zeros(count, dtype=np.uint64)
    for i in range(n):
        combined += hashes[i : i + count] * _POSITION_MULTIPLIERS[i]
    ends = np.cumsum(lengths)
    starts = ends - lengths
    long_text = lengths >= n
    window_starts = np.concatenate([np.arange(s, e - n + 1) for s, e in zip(starts[long_text], ends[long_text])]) \
        if long_text.any() else np.zeros(0, dtype=np.int64)
    out = np.zeros(int(counts.sum()), dtype=np.uint64)
    slots = np.cumsum(counts) - counts
    long_slots = np.concatenate([np.arange(s, s + c) for s, c in zip(slots[long_text], counts[long_text])]) \
        if long_text.any() else np.zeros(0, dtype=np.int64)
    out[long_slots] = mix64(combined[window_starts] + np.uint64(n))
    for k in np.flatnonzero(~long_text & (lengths > 0)):
        out[slots[k]] = ngram_hashes(token_lists[k], n)[0]
    return out, counts


def build_ngram_index(texts, n: int) -> set[int]:
    """The set of n-gram hashes over all `texts`; built once in the driver, then checked per record.

    Pass eval prompts, or prompt and reference joined as `record_text` joins messages, not bare short
    answers: a text under n words is one n-gram of its own, and an answer like "12" would then match
    every training message that is exactly "12".
    """
    index: set[int] = set()
    for text in texts:
        index.update(ngram_hashes(words(text), n).tolist())
    return index


def _shown(tokens: list[str], position: int, n: int) -> str:
    shared = " ".join(tokens[position : position + n])
    return shared if len(shared) <= 100 else shared[:97] + "..."


def check_contamination(record: dict, index: set[int], n: int) -> str | None:
    """Reject reason if the record shares a word n-gram with the eval index, else None.

    The n-grams run over all messages joined; each message shorter than n words is also checked whole,
    so a training prompt identical to a short eval prompt is caught.
    """
    if not index:
        return None
    tokens = words(record_text(record))
    for position, value in enumerate(ngram_hashes(tokens, n).tolist()):
        if value in index:
            return f"shares a {min(n, len(tokens))}-word n-gram with an eval text: '{_shown(tokens, position, n)}'"
    for turn, message in enumerate(record["messages"]):
        message_tokens = words(message["content"])
        if 0 < len(message_tokens) < n and ngram_hashes(message_tokens, n)[0].item() in index:
            return f"message {turn} equals an eval text: '{_shown(message_tokens, 0, n)}'"
    return None
