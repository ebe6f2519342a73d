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


def word_hashes(tokens: list[str]) -> np.ndarray:
    """A deterministic uint64 hash per token."""
    crcs = np.fromiter((zlib.crc32(t.encode("utf-8")) for t in tokens), dtype=np.uint64, count=len(tokens))
    return mix64(crcs)


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
