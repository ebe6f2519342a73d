"""Chat-template tokenization: labels on assistant tokens only, every assistant turn, truncation and drops."""

import re

import pytest

from instune.base_model import tokenizer_training_texts
from instune.data.tokenize import IGNORE_INDEX, Tokenized, TokenizeError, assistant_spans, tokenize_batch
from instune.default.tokenizer import IM_END, IM_START, train_tokenizer

MULTI_TURN = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 7 + 5?"},
    {"role": "assistant", "content": "12"},
    {"role": "user", "content": "And 12 - 3?"},
    {"role": "assistant", "content": "9, since 12 - 3 = 9."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(tokenizer_training_texts(per_domain=30), vocab_size=400)


def labelled_text(tokenizer, t: Tokenized) -> str:
    return tokenizer.decode([i for i, label in zip(t.input_ids, t.labels) if label != IGNORE_INDEX])


def test_every_assistant_turn_and_nothing_else_carries_labels(tokenizer):
    [t] = tokenize_batch([MULTI_TURN], tokenizer, max_length=512, truncation="drop")
    answers = [m["content"] for m in MULTI_TURN if m["role"] == "assistant"]
    # Labels are the answers with their end-of-turn token (so the model learns to stop), in order.
    assert labelled_text(tokenizer, t) == "".join(f"{a}{IM_END}\n" for a in answers)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(t.input_ids, t.labels))
    text = tokenizer.decode(t.input_ids)
    for prompt in ("Answer briefly.", "What is 7 + 5?", "And 12 - 3?", "Thanks!"):
        assert prompt in text and prompt not in labelled_text(tokenizer, t)
    assert t.labels[0] == IGNORE_INDEX


def test_labelled_runs_match_assistant_spans(tokenizer):
    [t] = tokenize_batch([MULTI_TURN], tokenizer, max_length=512, truncation="drop")
    runs, run = [], []
    for token, label in zip(t.input_ids, t.labels):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    runs += [tokenizer.decode(run)] if run else []
    text, spans = assistant_spans(MULTI_TURN, tokenizer)
    assert runs == [text[a:b] for a, b in spans]
    assert len(runs) == 3
    # Each run starts right after an assistant header.
    assert len(re.findall(re.escape(f"{IM_START}assistant\n"), text)) == 3


def test_truncation_cuts_and_drop_rejects(tokenizer):
    long = [{"role": "user", "content": "Repeat."}, {"role": "assistant", "content": "one two three " * 40}]
    [full] = tokenize_batch([long], tokenizer, max_length=10_000, truncation="drop")
    assert len(full.input_ids) > 40
    [cut] = tokenize_batch([long], tokenizer, max_length=40, truncation="truncate")
    assert len(cut.input_ids) == 40 and cut.input_ids == full.input_ids[:40] and cut.labels == full.labels[:40]
    [dropped] = tokenize_batch([long], tokenizer, max_length=40, truncation="drop")
    assert isinstance(dropped, TokenizeError)
    assert str(dropped) == f"{len(full.input_ids)} tokens is over max_length 40"


def test_no_assistant_token_left_after_truncation(tokenizer):
    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    results = tokenize_batch([long_prompt, short], tokenizer, max_length=32, truncation="truncate")
    assert isinstance(results[0], TokenizeError) and "no assistant tokens left" in str(results[0])
    # A failed record does not disturb its neighbours in the batch.
    assert isinstance(results[1], Tokenized) and labelled_text(tokenizer, results[1]) == f"ok{IM_END}\n"
