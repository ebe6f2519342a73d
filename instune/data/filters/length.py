"""Length bounds per message and per conversation, in characters and (with a tokenizer) tokens."""

from __future__ import annotations

from typing import Callable

from instune.data.schema import record_text


def _out_of_bounds(what: str, value: int, low: int | None, high: int | None, unit: str) -> str | None:
    if low is not None and value < low:
        return f"{what} has {value} {unit}, below the minimum {low}"
    if high is not None and value > high:
        return f"{what} has {value} {unit}, above the maximum {high}"
    return None


def check_length(
    record: dict,
    min_turn_chars: int | None = None,
    max_turn_chars: int | None = None,
    min_chars: int | None = None,
    max_chars: int | None = None,
    min_turn_tokens: int | None = None,
    max_turn_tokens: int | None = None,
    min_tokens: int | None = None,
    max_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> str | None:
    """Reject reason for the first bound the record breaks, else None. Unset bounds are not checked.

    A "turn" is one message. Conversation lengths are over `record_text` (messages joined by newlines).
    """
    needs_tokens = any(b is not None for b in (min_turn_tokens, max_turn_tokens, min_tokens, max_tokens))
    if needs_tokens and count_tokens is None:
        raise ValueError("token length bounds are set but no count_tokens function was given")

    for turn, message in enumerate(record["messages"]):
        what = f"message {turn} ({message['role']})"
        content = message["content"]
        reason = _out_of_bounds(what, len(content), min_turn_chars, max_turn_chars, "characters")
        if reason is None and (min_turn_tokens is not None or max_turn_tokens is not None):
            reason = _out_of_bounds(what, count_tokens(content), min_turn_tokens, max_turn_tokens, "tokens")
        if reason:
            return reason

    text = record_text(record)
    reason = _out_of_bounds("conversation", len(text), min_chars, max_chars, "characters")
    if reason is None and (min_tokens is not None or max_tokens is not None):
        reason = _out_of_bounds("conversation", count_tokens(text), min_tokens, max_tokens, "tokens")
    return reason
