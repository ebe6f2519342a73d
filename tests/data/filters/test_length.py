import pytest

from instune.config import LengthFilterConfig
from instune.data.filters.length import check_length
from instune.data.schema import make_record


def conversation(*contents: str) -> dict:
    roles = ["user", "assistant"] * len(contents)
    return make_record("src:f.jsonl:line 1", "src", "d", [{"role": r, "content": c} for r, c in zip(roles, contents)])


def count_words(text: str) -> int:
    return len(text.split())


def test_chars_only_bounds_accept_and_reject_each_side():
    record = conversation("What is 2 + 2?", "4")
    assert check_length(record, min_turn_chars=1, max_turn_chars=50, min_chars=5, max_chars=100) is None
    assert check_length(conversation("hi", ""), min_turn_chars=1) == (
        "message 1 (assistant) has 0 characters, below the minimum 1"
    )
    assert check_length(record, max_turn_chars=10) == "message 0 (user) has 14 characters, above the maximum 10"
    assert check_length(record, min_chars=20) == "conversation has 16 characters, below the minimum 20"
    assert check_length(record, max_chars=15) == "conversation has 16 characters, above the maximum 15"


def test_token_bounds_use_the_given_counter():
    record = conversation("one two three", "four five")
    assert check_length(record, min_turn_tokens=2, max_tokens=5, count_tokens=count_words) is None
    assert check_length(record, min_turn_tokens=3, count_tokens=count_words) == (
        "message 1 (assistant) has 2 tokens, below the minimum 3"
    )
    assert check_length(record, max_turn_tokens=2, count_tokens=count_words) == (
        "message 0 (user) has 3 tokens, above the maximum 2"
    )
    assert check_length(record, min_tokens=6, count_tokens=count_words) == (
        "conversation has 5 tokens, below the minimum 6"
    )
    assert check_length(record, max_tokens=4, count_tokens=count_words) == (
        "conversation has 5 tokens, above the maximum 4"
    )


def test_token_bounds_without_a_counter_is_an_error():
    with pytest.raises(ValueError, match="count_tokens"):
        check_length(conversation("a", "b"), max_tokens=10)


def test_defaults_keep_short_verifiable_answers_and_drop_empty_messages():
    defaults = LengthFilterConfig().model_dump()
    for answer in ("12", '{"a": 1}', "[3, 1, 2]", "olleh"):
        assert check_length(conversation("Solve it.", answer), **defaults) is None
    assert "below the minimum 1" in check_length(conversation("Solve it.", ""), **defaults)
    assert "above the maximum" in check_length(conversation("x" * 20_001, "ok"), **defaults)
