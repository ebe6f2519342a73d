"""Gopher-style quality heuristics (Rae et al. 2021, "Scaling Language Models", appendix A) on assistant text.

Only assistant messages are judged: they are what the model learns to produce, while user prompts may
legitimately be terse, repetitive or pasted data. Each message is judged on its own, so one repeated
"Sure!" across turns is not a duplicate line. Word-based rules need `min_words` words that contain a
letter; below that a message is too short for ratios to mean anything, and short verifiable answers
("12", '{"a": 1}', a list of numbers) pass. Gopher's thresholds target web pages; the defaults in
`QualityFilterConfig` are looser, set so list-like instruction answers (Alpaca seed tasks) pass while
degenerate loops and pasted junk do not.

Chat answers hold code, tables and lists, which repeat lines and tokens by design; with
`skip_code_and_tables` the repetition rules judge only the text outside fenced code blocks and table rows,
with list markers removed (`repetition_text`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import regex

# A whitespace-separated word with at least one letter (\p{L}: the categories str.isalpha() accepts). The
# lookbehind anchors every match at a word's start, so a long run without letters costs linear time.
_PROSE_WORD = regex.compile(r"(?<!\S)\S*?\p{L}\S*")
# One odd multiplier per position in an n-gram, so "a b" and "b a" hash apart.
_POSITION_MULTIPLIERS = np.random.default_rng(4242).integers(1, 2**63, size=64, dtype=np.uint64) * 2 + 1


@functools.lru_cache(maxsize=256)
def _normalise_phrase(text: str) -> str:
    return " ".join(text.lower().replace("\u2019", "'").split())


def refusal_phrase(text: str, phrases: list[str]) -> str | None:
    """The first configured boilerplate/refusal phrase found in `text` (case and spacing ignored), else None."""
    normalised = " ".join(text.lower().replace("\u2019", "'").split())
    for phrase in phrases:
        if _normalise_phrase(phrase) in normalised:
            return phrase
    return None


_FENCE_MARKS = ("```", "~~~")
# A list item's marker at a line's start: "-", "*", "+", "1.", "2)".
_LIST_MARKER = regex.compile(r"^[ \t]*(?:[-*+]|\d{1,3}[.)])[ \t]+", regex.M)


def _table_row(stripped: str) -> bool:
    """A markdown table row or separator: starts with "|", or a "---|:--:" line."""
    return stripped.startswith("|") or (stripped.count("|") >= 1 and not stripped.strip("|-: \t"))


def repetition_text(text: str) -> str:
    """`text` without fenced code blocks (``` or ~~~, an unclosed one runs to the end) and table rows, and
    with list markers removed: what the repetition rules judge in chat answers."""
    if "```" in text or "~~~" in text or "|" in text:
        kept, fence = [], None
        for line in text.splitlines():
            stripped = line.strip()
            if fence is not None:
                if stripped.startswith(fence):
                    fence = None
                continue
            opening = next((mark for mark in _FENCE_MARKS if stripped.startswith(mark)), None)
            if opening is not None:
                fence = opening
            elif not _table_row(stripped):
                kept.append(line)
        text = "\n".join(kept)
    return _LIST_MARKER.sub("", text)


def duplicate_line_char_fraction(text: str) -> float:
    """Characters in non-blank lines that repeat an earlier line, over characters in all non-blank lines."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    total = sum(len(line) for line in lines)
    seen: set[str] = set()
    repeated = 0
    for line in lines:
        if line in seen:
            repeated += len(line)
        seen.add(line)
    return repeated / total if total else 0.0


# The n-gram rules work on one integer per word (Python's string hash: only compared within one call). Every
# n-gram's hash comes from one prefix sum, sum_k h[i+k] B^(i+k), times B^-i (B odd, so invertible mod 2^64),
# so each rule is a few array operations whatever n is, instead of a tuple per window.
_BASE = 0x9E3779B97F4A7C15
_powers = np.ones(1, dtype=np.uint64)
_inverse_powers = np.ones(1, dtype=np.uint64)


def _power_tables(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(B^i, B^-i) mod 2^64 for i < size, grown by doubling and kept."""
    global _powers, _inverse_powers
    if len(_powers) < size:
        length = max(size, 2 * len(_powers))
        _powers = np.cumprod(np.r_[np.uint64(1), np.full(length - 1, _BASE, dtype=np.uint64)], dtype=np.uint64)
        inverse = np.full(length - 1, pow(_BASE, -1, 2**64), dtype=np.uint64)
        _inverse_powers = np.cumprod(np.r_[np.uint64(1), inverse], dtype=np.uint64)
    return _powers[:size], _inverse_powers[:size]


@dataclass
class _Words:
    prefix: np.ndarray  # prefix[i]: sum of h[k] B^k for k < i (mod 2^64)
    ends: np.ndarray  # ends[i]: characters in the first i words
    inverse: np.ndarray

    @property
    def count(self) -> int:
        return len(self.ends) - 1

    @property
    def total(self) -> int:
        return int(self.ends[-1])

    def windows(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(one hash per word n-gram window, characters in each window's words)."""
        count = self.count - n + 1
        grams = (self.prefix[n:] - self.prefix[:count]) * self.inverse[:count]
        return grams, self.ends[n:] - self.ends[:count]


def _word_arrays(words: list[str]) -> _Words:
    hashes = np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    powers, inverse = _power_tables(len(words) + 1)
    zero = np.zeros(1, dtype=np.uint64)
    prefix = np.concatenate([zero, np.cumsum(hashes * powers[: len(words)], dtype=np.uint64)])
    return _Words(prefix, np.concatenate([[0], np.cumsum(lengths)]), inverse)


def _repeats(grams: np.ndarray) -> bool:
    ordered = np.sort(grams)
    return bool((ordered[1:] == ordered[:-1]).any())


def _top_fraction(words: _Words, n: int) -> float:
    if words.count < n or not words.total:
        return 0.0
    grams, chars = words.windows(n)
    if not _repeats(grams):
        return 0.0
    _, first, counts = np.unique(grams, return_index=True, return_counts=True)
    count = int(counts.max())
    # Among equally frequent n-grams the one seen first counts, as Counter.most_common(1) would pick.
    return min(1.0, int(chars[first[counts == count].min()]) * count / words.total)


def _duplicate_fraction(words: _Words, n: int) -> float:
    if words.count < n or not words.total:
        return 0.0
    grams, chars = words.windows(n)
    if not _repeats(grams):  # nothing repeats: the usual case, no walk needed
        return 0.0
    seen: set[int] = set()
    repeated = i = 0
    grams, chars = grams.tolist(), chars.tolist()
    while i < len(grams):
        if grams[i] in seen:
            repeated += chars[i]
            i += n  # count each repeated stretch once, as Gopher does
        else:
            seen.add(grams[i])
            i += 1
    return repeated / words.total


def top_ngram_char_fraction(words: list[str], n: int) -> float:
    """Characters covered by the most frequent word n-gram (if it repeats), over all word characters."""
    return _top_fraction(_word_arrays(words), n)


def duplicate_ngram_char_fraction(words: list[str], n: int) -> float:
    """Characters in word n-grams that repeat an earlier n-gram (non-overlapping), over all word characters."""
    return _duplicate_fraction(_word_arrays(words), n)


def text_quality_problem(
    text: str,
    min_words: int,
    min_mean_word_length: float,
    max_mean_word_length: float,
    max_symbol_word_ratio: float,
    max_non_alpha_word_fraction: float,
    max_duplicate_line_char_fraction: float,
    max_top_ngram_char_fraction: dict[int, float],
    max_duplicate_ngram_char_fraction: dict[int, float],
    refusal_phrases: list[str],
    skip_code_and_tables: bool = False,
) -> str | None:
    """The first heuristic `text` fails, as a short phrase, else None."""
    phrase = refusal_phrase(text, refusal_phrases)
    if phrase:
        return f"contains the boilerplate phrase '{phrase}'"
    words = text.split()
    # Prose words carry a letter; numbers, operators and brackets do not. Counting only prose here keeps
    # long number lists, JSON and worked arithmetic out of the word rules, and keeps "=" and "12" from
    # dragging the mean word length down.
    prose = _PROSE_WORD.findall(text)
    if len(prose) < min_words:
        return None

    mean_length = sum(map(len, prose)) / len(prose)
    if mean_length < min_mean_word_length:
        return f"mean word length {mean_length:.1f} is below {min_mean_word_length}"
    if mean_length > max_mean_word_length:
        return f"mean word length {mean_length:.1f} is above {max_mean_word_length}"
    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    if symbols / len(words) > max_symbol_word_ratio:
        return f"symbol-to-word ratio {symbols / len(words):.2f} is above {max_symbol_word_ratio}"
    non_alpha = 1 - len(prose) / len(words)
    if non_alpha > max_non_alpha_word_fraction:
        return f"{non_alpha:.0%} of words have no letter, above {max_non_alpha_word_fraction:.0%}"
    if skip_code_and_tables:
        text = repetition_text(text)
        if len(_PROSE_WORD.findall(text)) < min_words:  # too little prose left for repetition ratios
            return None
    duplicate_lines = duplicate_line_char_fraction(text)
    if duplicate_lines > max_duplicate_line_char_fraction:
        limit = max_duplicate_line_char_fraction
        return f"{duplicate_lines:.0%} of characters are in repeated lines, above {limit:.0%}"
    lowered = _word_arrays(text.lower().split())
    for n, limit in sorted(max_top_ngram_char_fraction.items()):
        fraction = _top_fraction(lowered, n)
        if fraction > limit:
            return f"the most frequent {n}-gram covers {fraction:.0%} of characters, above {limit:.0%}"
    for n, limit in sorted(max_duplicate_ngram_char_fraction.items()):
        fraction = _duplicate_fraction(lowered, n)
        if fraction > limit:
            return f"repeated {n}-grams cover {fraction:.0%} of characters, above {limit:.0%}"
    return None


def check_quality(record: dict, **thresholds) -> str | None:
    """Reject reason naming the first assistant message that fails a heuristic, else None.

    `thresholds` are the keyword arguments of `text_quality_problem` (the fields of the quality config).
    """
    for turn, message in enumerate(record["messages"]):
        if message["role"] != "assistant":
            continue
        problem = text_quality_problem(message["content"], **thresholds)
        if problem:
            return f"assistant message {turn}: {problem}"
    return None
