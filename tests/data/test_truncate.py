import json
from pathlib import Path

import numpy as np
import pytest

from instune.data.truncate import IGNORE_INDEX, answer_runs, fit_tokens

X = IGNORE_INDEX


def example(*parts: tuple[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """ids 0..n-1 and labels from ("p", k) prompt and ("a", k) answer parts of k tokens."""
    ids, labels = [], []
    for kind, k in parts:
        start = len(ids)
        ids += range(start, start + k)
        labels += list(range(start, start + k)) if kind == "a" else [X] * k
    return np.array(ids), np.array(labels)


def test_answer_runs_are_the_assistant_turns():
    _, labels = example(("p", 3), ("a", 2), ("p", 4), ("a", 3))
    starts, ends = answer_runs(labels)
    assert starts.tolist() == [3, 9] and ends.tolist() == [5, 12]


def test_prompt_left_keeps_the_whole_answer_and_the_end_of_the_prompt():
    ids, labels = example(("p", 20), ("a", 6))
    kept_ids, kept_labels = fit_tokens(ids, labels, 10, "prompt_left")
    assert kept_ids.tolist() == list(range(16, 26))  # the last 4 prompt tokens, then the answer
    assert (kept_labels[:4] == X).all() and kept_labels[4:].tolist() == list(range(20, 26))
    # Right truncation keeps the prompt and trains on nothing: dropped.
    assert fit_tokens(ids, labels, 10, "truncate") == "no assistant tokens left to train on (after truncation)"
    assert fit_tokens(ids, labels, 10, "drop") == "26 tokens is over max_length 10"
    # What fits is left alone, whatever the setting.
    for truncation in ("prompt_left", "truncate", "drop"):
        assert [a.tolist() for a in fit_tokens(ids, labels, 26, truncation)] == [ids.tolist(), labels.tolist()]


def test_prompt_left_leaves_a_prompt_token_before_the_answer():
    ids, labels = example(("p", 20), ("a", 10))
    # The answer alone is max_length: no prompt token would be left, the first target would have no context.
    assert fit_tokens(ids, labels, 10, "prompt_left").startswith("30 tokens is over max_length 10, and no answer")
    assert len(fit_tokens(ids, labels, 11, "prompt_left")[0]) == 11


def test_prompt_left_on_long_multi_turn_keeps_whole_turns_from_the_start():
    ids, labels = example(("p", 3), ("a", 3), ("p", 3), ("a", 3), ("p", 3), ("a", 6))
    # All answers (12 tokens from the first) do not fit in 12, so keep turns 1-2 whole (12 tokens).
    kept_ids, kept_labels = fit_tokens(ids, labels, 13, "prompt_left")
    assert kept_ids.tolist() == list(range(12)) and answer_runs(kept_labels)[1].tolist() == [6, 12]
    # With room for every answer and a prompt token, the left cut is used instead.
    kept_ids, _ = fit_tokens(ids, labels, 19, "prompt_left")
    assert kept_ids.tolist() == list(range(2, 21))


def test_unknown_truncation_is_an_internal_error():
    with pytest.raises(AssertionError):
        fit_tokens(*example(("p", 2), ("a", 2)), 3, "middle")


SEED_TASKS = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "alpaca_seed_tasks.jsonl"


@pytest.mark.skipif(not SEED_TASKS.is_file(), reason="needs ../shared/data/alpaca_seed_tasks.jsonl")
def test_real_seed_tasks_keep_their_whole_answers():
    """Through the tokenizer, at a length where right truncation cuts answers of real Alpaca seed tasks."""
    from instune.base_model import tokenizer_training_texts
    from instune.data.formats import read_canonical
    from instune.data.tokenize import Tokenized, tokenize_batch
    from instune.default.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(tokenizer_training_texts(per_domain=30), vocab_size=400)
    records = [r for kind, r in read_canonical(str(SEED_TASKS), "seed", "d", "auto", None, 10**6) if kind == "kept"]
    conversations = [r["messages"] for r in records]
    full = tokenize_batch(conversations, tokenizer, 10**6, "drop")
    answers = [int((np.array(t.labels) != X).sum()) for t in full]
    max_length = 256
    right = tokenize_batch(conversations, tokenizer, max_length, "truncate")
    left = tokenize_batch(conversations, tokenizer, max_length, "prompt_left")
    cut_by_right = sum(not isinstance(r, Tokenized) or int((np.array(r.labels) != X).sum()) < n
                       for r, n in zip(right, answers))
    assert cut_by_right >= 5  # answers lost whole or in part at the right end
    for t, r, n in zip(full, left, answers):
        if n < max_length:  # the answer fits with a prompt token: kept whole, ending as the record ends
            assert isinstance(r, Tokenized) and len(r.input_ids) <= max_length
            assert int((np.array(r.labels) != X).sum()) == n and r.input_ids == t.input_ids[-len(r.input_ids):]
        else:
            assert not isinstance(r, Tokenized) and "no answer fits whole" in str(r)
