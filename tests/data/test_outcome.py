"""Outcome markers: which labels count, where the marker goes, and that tokenization sees it (phase 2)."""

import json

import pyarrow as pa
import pytest

from instune.base_model import tokenizer_training_texts
from instune.data.outcome import OutcomeMarkers, mark_outcome, outcome_of, with_marker
from instune.data.splits import TokenizeAndPack
from instune.data.tokenize import IGNORE_INDEX
from instune.default.tokenizer import train_tokenizer

MARKERS = OutcomeMarkers(field="outcome", success="GOOD RUN.", failure="BAD RUN.", position="system")
CHAT = [{"role": "user", "content": "Fix the bug."}, {"role": "assistant", "content": "Done."}]


@pytest.mark.parametrize("value, expected", [
    ("success", "success"), (" Passed ", "success"), (True, "success"), (1, "success"), ("correct", "success"),
    ("failure", "failure"), ("FAILED", "failure"), (False, "failure"), (0, "failure"), ("incorrect", "failure"),
    ("maybe", None), (None, None), ([1], None),
])
def test_outcome_values(value, expected):
    assert outcome_of({"outcome": value}, "outcome") == expected


def test_missing_field_is_unlabelled():
    assert outcome_of({"label": "success"}, "outcome") is None
    assert outcome_of({"label": "success"}, "label") == "success"


def test_system_marker_is_a_new_first_message_or_leads_an_existing_one():
    marked = with_marker(CHAT, "M.", "system")
    assert marked == [{"role": "system", "content": "M."}] + CHAT
    with_system = [{"role": "system", "content": "Be terse."}] + CHAT
    assert with_marker(with_system, "M.", "system")[0] == {"role": "system", "content": "M.\n\nBe terse."}
    assert with_system[0]["content"] == "Be terse."  # the input is not changed


def test_prefix_marker_leads_the_first_user_message():
    two_users = CHAT + [{"role": "user", "content": "Again."}, {"role": "assistant", "content": "Ok."}]
    marked = with_marker(two_users, "M.", "prefix")
    assert [m["content"] for m in marked] == ["M.\n\nFix the bug.", "Done.", "Again.", "Ok."]
    completion = [{"role": "assistant", "content": "All of the text."}]
    assert with_marker(completion, "M.", "prefix") == [{"role": "system", "content": "M."}] + completion


def test_mark_outcome_reads_the_metadata_json():
    messages, outcome = mark_outcome(CHAT, json.dumps({"outcome": "fail"}), MARKERS)
    assert outcome == "failure" and messages[0] == {"role": "system", "content": "BAD RUN."}
    assert mark_outcome(CHAT, json.dumps({"task": "x"}), MARKERS) == (CHAT, None)
    assert mark_outcome(CHAT, "", MARKERS) == (CHAT, None)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(tokenizer_training_texts(per_domain=30), vocab_size=400).save_pretrained(str(directory))
    return str(directory)


def records_batch(outcomes: list) -> pa.Table:
    messages_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    return pa.table({
        "id": [f"s:f.jsonl:line {i}" for i in range(len(outcomes))],
        "source": ["s"] * len(outcomes),
        "messages": pa.array([[{"role": "user", "content": f"Task {i}."}, {"role": "assistant", "content": f"Answer {i}."}]
                              for i in range(len(outcomes))], messages_type),
        "metadata": [json.dumps({} if o is None else {"outcome": o}) for o in outcomes],
    })


def test_tokenize_and_pack_puts_markers_in_the_prompt_not_the_labels(tokenizer_dir):
    outcomes = ["success", "failure", None, "failure"]
    step = TokenizeAndPack(tokenizer_dir, seq_len=64, truncation="drop", pack=False, outcome_markers=MARKERS)
    rows = step(records_batch(outcomes)).to_pylist()
    texts = [step.tokenizer.decode([i for i in r["input_ids"] if i != step.tokenizer.pad_token_id]) for r in rows]
    labelled = [step.tokenizer.decode([i for i, l in zip(r["input_ids"], r["labels"]) if l != IGNORE_INDEX])
                for r in rows]
    assert [("GOOD RUN." in t, "BAD RUN." in t) for t in texts] == [(True, False), (False, True), (False, False),
                                                                   (False, True)]
    assert all("RUN." not in text for text in labelled)
    assert [text.split("<|im_end|>")[0] for text in labelled] == [f"Answer {i}." for i in range(4)]
    # Without markers the same batch tokenizes with no marker text at all.
    plain = TokenizeAndPack(tokenizer_dir, seq_len=64, truncation="drop", pack=False)
    assert all("RUN." not in plain.tokenizer.decode(r["input_ids"]) for r in plain(records_batch(outcomes)).to_pylist())
