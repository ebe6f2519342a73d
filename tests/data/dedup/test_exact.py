import json
from pathlib import Path

import pytest
import ray

from instune.data.dedup.exact import exact_dedup, exact_dedup_records, id_of, normalise_text, order_key, text_hash
from instune.data.schema import make_record

# This file sits three levels below the repository root.
DATA = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"


def conversation(position: str, user: str, assistant: str, source: str = "src") -> dict:
    return make_record(f"{source}:train.jsonl:{position}", source, "d", [
        {"role": "user", "content": user}, {"role": "assistant", "content": assistant},
    ])


def test_normalised_text_ignores_case_and_spacing():
    assert normalise_text("  Hello\n\tWORLD  again ") == "hello world again"
    a = conversation("line 1", "What is 2 + 2?", "4")
    b = conversation("line 2", "what  is 2 + 2?\n", "4")
    c = conversation("line 3", "What is 2 + 3?", "5")
    assert text_hash(a) == text_hash(b) != text_hash(c)


def test_order_key_sorts_ids_naturally_and_keeps_the_id():
    ids = ["s:f.jsonl:line 10", "s:f.jsonl:line 9", "s:f.jsonl:index 2 instance 10", "s:f.jsonl:index 2 instance 3"]
    ordered = sorted(ids, key=order_key)
    assert ordered == ["s:f.jsonl:index 2 instance 3", "s:f.jsonl:index 2 instance 10", "s:f.jsonl:line 9",
                       "s:f.jsonl:line 10"]
    assert [id_of(order_key(i)) for i in ids] == ids


def test_keeps_the_first_by_id_order_not_input_order():
    records = [
        conversation("line 10", "Sort [3, 1, 2].", "[1, 2, 3]"),
        conversation("line 2", "What is 7 + 5?", "12"),
        conversation("line 9", "SORT [3, 1, 2].", "[1, 2, 3]"),
        conversation("line 11", "sort [3, 1, 2].", "[1,  2, 3]"),
    ]
    kept, rejects = exact_dedup_records(records)
    assert [r["id"] for r in kept] == ["src:train.jsonl:line 2", "src:train.jsonl:line 9"]
    assert [(r["record"], r["stage"], r["reason"]) for r in rejects] == [
        ("line 10", "dedup:exact", "exact duplicate of src:train.jsonl:line 9"),
        ("line 11", "dedup:exact", "exact duplicate of src:train.jsonl:line 9"),
    ]


def test_real_sharegpt_turn_pairs_dedup_to_the_distinct_count():
    path = DATA / "sharegpt_dummy_conversation.json"
    if not path.is_file():
        pytest.skip(f"real test data missing: {path} (see /work/shared/data/README.md)")
    # Whole conversations are all distinct; their single exchanges ("Goodbye" ...) repeat a lot.
    records = []
    for i, item in enumerate(json.loads(path.read_text(encoding="utf-8"))):
        turns = item["conversations"]
        for k in range(0, len(turns) - 1, 2):
            records.append(conversation(f"index {i} turn {k}", turns[k]["value"], turns[k + 1]["value"], "sharegpt"))
    distinct = {normalise_text(r["messages"][0]["content"] + "\n" + r["messages"][1]["content"]) for r in records}
    kept, rejects = exact_dedup_records(records)
    assert len(kept) == len(distinct) == 503  # of 1000 exchanges
    assert len(rejects) == len(records) - len(distinct)
    assert {text_hash(r) for r in kept} == {text_hash(r) for r in records}


def test_ray_exact_dedup_is_global_across_blocks(local_ray):
    # 48 distinct records; copies of 0..11 are appended at the end, so they land in other blocks.
    originals = [conversation(f"line {i}", f"Question number {i}?", f"Answer {i}.") for i in range(48)]
    copies = [conversation(f"line {100 + i}", f"QUESTION  number {i}?", f"answer {i}.") for i in range(12)]
    third = [conversation(f"line {200 + i}", f"question number {i}?", f"Answer {i}.") for i in range(3)]
    records = originals + copies + third
    ds = ray.data.from_items(records, override_num_blocks=8)
    assert ds.materialize().num_blocks() == 8
    kept, rejects = exact_dedup(ds)
    kept_ids = sorted(r["id"] for r in kept.take_all())
    assert kept_ids == sorted(r["id"] for r in originals)
    rows = sorted(rejects.take_all(), key=lambda r: r["record"])
    assert len(rows) == 15
    expected_kept, expected_rejects = exact_dedup_records(records)
    assert rows == sorted(expected_rejects, key=lambda r: r["record"])
    assert rows[0] == {
        "source": "src", "file": "train.jsonl", "record": "line 100", "stage": "dedup:exact",
        "reason": "exact duplicate of src:train.jsonl:line 0", "example": "QUESTION  number 0?\nanswer 0.",
    }
    assert kept.schema().names == ["id", "source", "domain", "messages", "metadata"]


def test_ray_exact_dedup_without_duplicates_keeps_everything(local_ray):
    records = [conversation(f"line {i}", f"Q{i}", f"A{i}") for i in range(10)]
    kept, rejects = exact_dedup(ray.data.from_items(records, override_num_blocks=3))
    assert kept.count() == 10
    assert rejects.count() == 0
