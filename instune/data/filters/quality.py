"""Gopher-style quality heuristics (Rae et al. 2021, "Scaling Language Models", appendix A) on assistant text.

Only assistant messages are judged: they are what the model learns to produce, while user prompts may
legitimately be terse, repetitive or pasted data. Each message is judged on its own, so one repeated
"Sure!" across turns is not a duplicate line. Word-based rules need `min_words` words that contain a
letter; below that a message is too short for ratios to mean anything, and short verifiable answers
("12", '{"a": 1}', a list of numbers) pass. Gopher's thresholds target web pages; the defaults in
`QualityFilterConfig` are looser, set so list-like instruction answers (Alpaca seed tasks) pass while
degenerate loops and pasted junk do not.
"""

from __future__ import annotations

from collections import Counter


def _normalise_phrase(text: str) -> str:
    return " ".join(text.lower().replace("\u2019", "'").split())


def refusal_phrase(text: str, phrases: list[str]) -> str | None:
    """The first configured boilerplate/refusal phrase found in `text` (case and spacing ignored), else None."""
    normalised = _normalise_phrase(text)
    for phrase in phrases:
        if _normalise_phrase(phrase) in normalised:
            return phrase
    return None


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


def top_ngram_char_fraction(words: list[str], n: int) -> float:
    """Characters covered by the most frequent word n-gram (if it repeats), over all word characters."""
    total = sum(len(w) for w in words)
    if len(words) < n or not total:
        return 0.0
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    gram, count = counts.most_common(1)[0]
    if count < 2:
        return 0.0
    return min(1.0, sum(len(w) for w in gram) * count / total)


def duplicate_ngram_char_fraction(words: list[str], n: int) -> float:
    """Characters in word n-grams that repeat an earlier n-gram (non-overlapping), over all word characters."""
    total = sum(len(w) for w in words)
    if len(words) < n or not total:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    repeated = 0
    i = 0
    while i <= len(words) - n:
        gram = tuple(words[i : i + n])
        if gram in seen:
            repeated += sum(len(w) for w in gram)
            i += n  # count each repeated stretch once, as Gopher does
        else:
            seen.add(gram)
            i += 1
    return repeated / total


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
) -> str | None:
    """The first heuristic `text` fails, as a short phrase, else None."""
    phrase = refusal_phrase(text, refusal_phrases)
    if phrase:
        return f"contains the boilerplate phrase '{phrase}'"
    words = text.split()
    # Prose words carry a letter; numbers, operators and brackets do not. Counting only prose here keeps
    # long number lists, JSON and worked arithmetic out of the word rules, and keeps "=" and "12" from
    # dragging the mean word length down.
    prose = [w for w in words if any(ch.isalpha() for ch in w)]
    if len(prose) < min_words:
        return None

    mean_length = sum(len(w) for w in prose) / len(prose)
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
    duplicate_lines = duplicate_line_char_fraction(text)
    if duplicate_lines > max_duplicate_line_char_fraction:
        limit = max_duplicate_line_char_fraction
        return f"{duplicate_lines:.0%} of characters are in repeated lines, above {limit:.0%}"
    lowered = [w.lower() for w in words]
    for n, limit in sorted(max_top_ngram_char_fraction.items()):
        fraction = top_ngram_char_fraction(lowered, n)
        if fraction > limit:
            return f"the most frequent {n}-gram covers {fraction:.0%} of characters, above {limit:.0%}"
    for n, limit in sorted(max_duplicate_ngram_char_fraction.items()):
        fraction = duplicate_ngram_char_fraction(lowered, n)
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
