import json
from pathlib import Path

import pytest
import ray

from instune.config import FilterConfig
from instune.data.filters import (
    build_checks,
    filter_dataset,
    record_location,
    reject_for_record,
    split_records,
)
from instune.data.schema import REJECT_COLUMNS, make_record

# This file sits three levels below the repository root.
DATA = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}


def conversation(index: int, user: str, assistant: str) -> dict:
    return make_record(f"src:train.jsonl:line {index}", "src", "d", [
        {"role": "user", "content": user}, {"role": "assistant", "content": assistant},
    ])


def sharegpt_records() -> list[dict]:
    path = DATA / "sharegpt_dummy_conversation.json"
    if not path.is_file():
        pytest.skip(f"real test data missing: {path} (see /work/shared/data/README.md)")
    conversations = json.loads(path.read_text(encoding="utf-8"))
    return [
        make_record(
            f"sharegpt:{path.name}:index {i}",
            "sharegpt",
            "chat",
            [{"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]} for turn in item["conversations"]],
        )
        for i, item in enumerate(conversations)
    ]


def mixed_records() -> list[dict]:
    return [
        conversation(1, "What is 7 + 5?", "12"),
        conversation(2, "Reverse 'hello'.", ""),
        conversation(3, "Tell me a secret.", "As an AI language model, I cannot do that."),
        conversation(4, "Wie geht es dir heute?", "Mir geht es gut, danke der Nachfrage. Und dir?"),
        conversation(5, "Natalia sold clips to 48 of her friends in April and then she sold half as many", "72"),
        conversation(6, "Sort [3, 1, 2].", "[1, 2, 3]"),
    ]


def all_filters() -> FilterConfig:
    return FilterConfig.model_validate({"language": {}, "decontaminate": {}})


EVAL_TEXTS = ["Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."]


def test_record_location_splits_the_id():
    assert record_location({"id": "src:train.jsonl:line 3", "source": "src"}) == ("train.jsonl", "line 3")
    assert record_location({"id": "s:a:b.json:index 5 instance 2", "source": "s"}) == ("a:b.json", "index 5 instance 2")
    assert record_location({"id": "s:f.json:7", "source": "s"}) == ("f.json", "index 7")
    reject = reject_for_record(conversation(9, "q", "a"), "filter:length", "too short")
    assert reject == {
        "source": "src", "file": "train.jsonl", "record": "line 9",
        "stage": "filter:length", "reason": "too short", "example": "q\na",
    }


def test_build_checks_follows_the_config():
    assert [stage for stage, _ in build_checks(FilterConfig())] == ["filter:length", "filter:quality"]
    assert build_checks(FilterConfig(length=None, quality=None)) == []
    stages = [stage for stage, _ in build_checks(all_filters(), eval_texts=EVAL_TEXTS)]
    assert stages == ["filter:length", "filter:quality", "filter:language", "filter:decontaminate"]


def test_split_records_reports_the_first_failing_stage():
    kept, rejects = split_records(mixed_records(), build_checks(all_filters(), eval_texts=EVAL_TEXTS))
    assert [r["id"] for r in kept] == ["src:train.jsonl:line 1", "src:train.jsonl:line 6"]
    assert [(r["record"], r["stage"]) for r in rejects] == [
        ("line 2", "filter:length"),
        ("line 3", "filter:quality"),
        ("line 4", "filter:language"),
        ("line 5", "filter:decontaminate"),
    ]
    assert all(set(r) == set(REJECT_COLUMNS) and r["reason"] for r in rejects)


def test_default_filters_keep_most_real_sharegpt_conversations():
    records = sharegpt_records()
    kept, rejects = split_records(records, build_checks(FilterConfig()))
    assert len(records) == 500
    # All are kept: the 12 identity answers ("As a language model, I go by the name Vicuna...") are not
    # refusals, and the chat defaults leave code and tables out of the repetition rules.
    assert len(kept) == len(records) and rejects == []


def test_default_filters_keep_real_alpaca_seed_answers():
    path = DATA / "alpaca_seed_tasks.jsonl"
    if not path.is_file():
        pytest.skip(f"real test data missing: {path} (see /work/shared/data/README.md)")
    records = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        task = json.loads(line)
        for k, instance in enumerate(task["instances"]):
            prompt = task["instruction"] + (f"\n\n{instance['input']}" if instance["input"] else "")
            records.append(conversation(line_number * 100 + k, prompt, instance["output"]))
    long_answers = sum(len(r["messages"][1]["content"].split()) >= 50 for r in records)
    kept, rejects = split_records(records, build_checks(FilterConfig()))
    assert long_answers >= 40  # the word rules really ran on these
    assert len(kept) >= 0.97 * len(records), [r["reason"] for r in rejects]


def test_filter_dataset_matches_the_plain_version_across_blocks(local_ray):
    records = mixed_records() + [conversation(10 + i, f"What is {i} + {i}?", str(2 * i)) for i in range(20)]
    checks = build_checks(all_filters(), eval_texts=EVAL_TEXTS)
    expected_kept, expected_rejects = split_records(records, checks)
    kept, rejects = filter_dataset(ray.data.from_items(records, override_num_blocks=4), checks)
    assert sorted(r["id"] for r in kept.take_all()) == sorted(r["id"] for r in expected_kept)
    key = lambda r: r["record"]  # noqa: E731
    assert sorted(rejects.take_all(), key=key) == sorted(expected_rejects, key=key)
    assert kept.schema().names == ["id", "source", "domain", "messages", "metadata"]


def test_filter_dataset_writes_rejects_to_the_quarantine_once_however_often_it_runs(local_ray, tmp_path):
    import pyarrow.parquet as pq

    records = mixed_records() + [conversation(10 + i, f"What is {i} + {i}?", str(2 * i)) for i in range(20)]
    checks = build_checks(all_filters(), eval_texts=EVAL_TEXTS)
    expected_kept, expected_rejects = split_records(records, checks)
    assert expected_rejects  # the quarantine has something to hold
    quarantine = tmp_path / "quarantine"
    kept, rejects = filter_dataset(ray.data.from_items(records, override_num_blocks=4), checks,
                                   quarantine=str(quarantine))
    assert rejects is None
    # The rejects are written as the kept records are consumed; a second run (a retried task does the same)
    # rewrites the same files rather than adding copies.
    for _ in range(2):
        assert sorted(r["id"] for r in kept.take_all()) == sorted(r["id"] for r in expected_kept)
    written = pq.read_table(quarantine).to_pylist()
    key = lambda r: r["record"]  # noqa: E731
    assert sorted(written, key=key) == sorted(expected_rejects, key=key)
    assert not [p for p in quarantine.iterdir() if not p.name.endswith(".parquet")]  # no partial files left
