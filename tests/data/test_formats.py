import json
from pathlib import Path

import pytest

from instune.data.formats import (
    ROLE_ALIASES,
    FileCounts,
    RecordError,
    count_file,
    detect_format,
    normalise,
    read_canonical,
    to_canonical,
    validate_field_map,
)
from instune.data.read import RawItem
from instune.data.schema import RECORD_COLUMNS, REJECT_COLUMNS
from instune.errors import UserError

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def shared_file(name: str) -> str:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"real test data {path} is missing (see /work/shared/data/README.md)")
    return str(path)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


# ---------------------------------------------------------------- formats


def test_alpaca_with_and_without_input_and_system():
    record = {"instruction": "Add.", "input": "2 + 2", "output": "4", "system": "Be brief."}
    assert normalise(record, "alpaca") == [system("Be brief."), user("Add.\n\n2 + 2"), assistant("4")]
    assert normalise({"instruction": "Hi", "input": None, "output": "Hello"}, "alpaca") == [
        user("Hi"),
        assistant("Hello"),
    ]


@pytest.mark.parametrize("alias, role", sorted(ROLE_ALIASES.items()))
def test_sharegpt_every_role_alias(alias, role):
    turns = [{"from": alias, "value": "x"}, {"from": "gpt", "value": "answer"}]
    assert normalise({"conversations": turns}, "sharegpt")[0]["role"] == role
    assert normalise({"items": turns}, "sharegpt")[0]["role"] == role  # the other key seen in the wild


def test_sharegpt_roles_are_case_insensitive_and_system_field_goes_first():
    record = {"system": "S", "conversations": [{"from": "Human", "value": "q"}, {"from": "GPT ", "value": "a"}]}
    assert normalise(record, "sharegpt") == [system("S"), user("q"), assistant("a")]


def test_openai_string_and_text_part_content():
    record = {
        "messages": [
            {"role": "developer", "content": "rules"},
            {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]},
            {"role": "assistant", "content": "ok"},
        ]
    }
    assert normalise(record, "openai") == [system("rules"), user("part one\npart two"), assistant("ok")]


def test_dolly_joins_context():
    record = {"instruction": "Summarise.", "context": "Long text.", "response": "Short.", "category": "summarization"}
    assert normalise(record, "dolly") == [user("Summarise.\n\nLong text."), assistant("Short.")]
    assert normalise({**record, "context": ""}, "dolly")[0] == user("Summarise.")


def test_completion_is_one_assistant_message():
    assert normalise({"text": "Once upon a time."}, "completion") == [assistant("Once upon a time.")]


def test_mapped_alpaca_fields_and_messages_in_either_shape():
    field_map = {"instruction": "question", "output": "answer", "system": "persona"}
    record = {"question": "2+3?", "answer": "5", "persona": "tutor", "input": "ignored: not mapped"}
    assert normalise(record, "mapped", field_map) == [system("tutor"), user("2+3?"), assistant("5")]
    sharegpt_shape = {"dialog": [{"from": "human", "value": "q"}, {"from": "bard", "value": "a"}]}
    openai_shape = {"dialog": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    for record in (sharegpt_shape, openai_shape):
        assert normalise(record, "mapped", {"messages": "dialog"}) == [user("q"), assistant("a")]
    with pytest.raises(RecordError, match="^missing field 'answer'$"):
        normalise({"question": "q"}, "mapped", field_map)


@pytest.mark.parametrize(
    "fmt, field_map, message",
    [
        ("mapped", None, " is required with format: mapped"),
        ("mapped", {"question": "q", "output": "a"}, r"unknown key\(s\) \['question'\]"),
        ("mapped", {"output": "a"}, "needs 'instruction' and 'output'"),
        ("mapped", {"messages": "m", "output": "a"}, "only 'system' may go with it"),
        ("alpaca", {"instruction": "q", "output": "a"}, " is only used with format: mapped"),
    ],
)
def test_validate_field_map_errors(fmt, field_map, message):
    with pytest.raises(UserError, match=f"^source 'qa': field_map.*{message}"):
        validate_field_map("qa", fmt, field_map)


def test_validate_field_map_accepts_good_maps():
    validate_field_map("qa", "mapped", {"instruction": "q", "output": "a", "input": "ctx"})
    validate_field_map("qa", "mapped", {"messages": "dialog", "system": "sys"})
    validate_field_map("qa", "auto", None)


@pytest.mark.parametrize(
    "record, fmt",
    [
        ({"messages": []}, "openai"),
        ({"conversations": []}, "sharegpt"),
        ({"items": []}, "sharegpt"),
        ({"instruction": "i", "context": "", "response": "r"}, "dolly"),
        ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
        ({"text": "t"}, "completion"),
        ({"question": "q", "answer": "a"}, None),
        ({"turns": ["q1", "q2"]}, None),
    ],
)
def test_detect_format(record, fmt):
    assert detect_format(record) == fmt


# ---------------------------------------------------------------- reject reasons


@pytest.mark.parametrize(
    "record, fmt, reason",
    [
        ({"instruction": "q", "output": ["a"]}, "alpaca", "field 'output' is an array, expected a string"),
        ({"instruction": "q"}, "alpaca", "missing field 'output'"),
        ({"instruction": " ", "output": "a"}, "alpaca", "empty prompt: 'instruction' and 'input' are empty"),
        ({"instruction": "q", "output": "  "}, "alpaca", "empty assistant content in 'output'"),
        ({"conversations": "hi"}, "sharegpt", "field 'conversations' is a string, expected an array"),
        ({"conversations": []}, "sharegpt", "empty conversation: 'conversations' is an empty array"),
        ({"id": 1}, "sharegpt", "missing field 'conversations'"),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                               {"from": "narrator", "value": "n"}]},
            "sharegpt",
            "unknown role 'narrator' in conversations[2]",
        ),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "user", "value": "q2"}]},
            "sharegpt",
            "no assistant message (nothing to train on): only user",
        ),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
            "sharegpt",
            "empty assistant content in conversations[1]",
        ),
        ({"conversations": [{"from": "human", "value": 3}]}, "sharegpt", "conversations[0].value is a number"),
        ({"conversations": ["q"]}, "sharegpt", "conversations[0] is a string, expected an object"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "openai", "unknown role 'tool' in messages[0]"),
        ({"messages": [{"role": 1, "content": "x"}]}, "openai", "messages[0] role is a number, expected a string"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}]},
            "openai",
            "messages[0].content[0] is not a text part",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
            "openai",
            "messages[1].content is null, expected a string or text parts",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a \ud800"}]},
            "openai",
            "messages[1] holds an unpaired surrogate at character 2",
        ),
        ({"text": 5}, "completion", "field 'text' is a number, expected a string"),
        ({"instruction": "q", "response": ""}, "dolly", "empty assistant content in 'response'"),
        ({"question": "q"}, "auto", "cannot detect the format from keys [question]"),
        ({"question_id": 1, "turns": ["a", "b"]}, "auto", "no assistant message: 'turns' holds 2 user prompt"),
    ],
)
def test_reject_reasons(record, fmt, reason):
    with pytest.raises(RecordError) as caught:
        normalise(record, fmt)
    assert str(caught.value).startswith(reason), str(caught.value)
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------- canonical records and rejects


def test_to_canonical_ids_domains_metadata_and_stages():
    items = [
        RawItem("line 1", {"instruction": "q", "output": "a", "category": "qa", "id": 7}, None, "{...1}"),
        RawItem("line 2", None, "malformed JSON: Expecting value at column 1", "{oops"),
        RawItem("line 3", {"text": "t", "domain": "arithmetic", "outcome": "correct"}, None, "{...3}"),
        RawItem("line 4", {"conversations": []}, None, '{"conversations": []}'),
        RawItem("line 5", {"instruction": "seed", "instances": [{"input": "", "output": "x"},
                                                                {"input": "i", "output": ""}]}, None, "{...5}"),
    ]
    out = list(to_canonical(items, "web", "general", "auto", None, "/data/part-0.jsonl"))
    assert [kind for kind, _ in out] == ["kept", "rejected", "kept", "rejected", "kept", "rejected"]
    kept = [row for kind, row in out if kind == "kept"]
    rejected = [row for kind, row in out if kind == "rejected"]
    assert all(tuple(row) == RECORD_COLUMNS for row in kept)
    assert all(tuple(row) == REJECT_COLUMNS for row in rejected)
    assert [r["id"] for r in kept] == [
        "web:part-0.jsonl:line 1",
        "web:part-0.jsonl:line 3",
        "web:part-0.jsonl:line 5 instance 0",
    ]
    assert [r["domain"] for r in kept] == ["general", "arithmetic", "general"]
    assert json.loads(kept[0]["metadata"]) == {"category": "qa", "original_id": 7}
    assert json.loads(kept[1]["metadata"]) == {"domain": "arithmetic", "outcome": "correct"}
    assert [(r["record"], r["stage"], r["reason"]) for r in rejected] == [
        ("line 2", "read", "malformed JSON: Expecting value at column 1"),
        ("line 4", "normalise", "empty conversation: 'conversations' is an empty array"),
        ("line 5 instance 1", "normalise", "empty assistant content in 'output'"),
    ]
    assert rejected[0]["example"] == "{oops" and rejected[0]["file"] == "/data/part-0.jsonl"


def test_seed_task_without_instances_is_one_reject():
    items = [RawItem("line 1", {"instruction": "seed", "instances": []}, None, "{}")]
    [(kind, row)] = to_canonical(items, "s", "d", "alpaca", None, "f.jsonl")
    assert (kind, row["reason"]) == ("rejected", "field 'instances' must be a non-empty array of {input, output}")


def test_count_file_accounts_for_every_record(tmp_path):
    lines = [
        json.dumps({"instruction": "q", "output": "a"}),
        "{broken",
        json.dumps({"conversations": [{"from": "narrator", "value": "x"}]}),
        json.dumps({"instruction": "seed", "instances": [{"input": "", "output": "1"}, {"input": "", "output": "2"},
                                                         {"input": "", "output": ""}]}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"text": "x" * 500}),
        "",
    ]
    file = tmp_path / "mixed.jsonl"
    file.write_text("\n".join(lines))
    counts = count_file(str(file), "s", "general", "auto", None, max_record_bytes=300)
    # 6 non-blank lines, the seed task counting three times: kept q/a + 2 instances; the rest rejected.
    assert counts == FileCounts(read=8, kept=3, rejected=5)


# ---------------------------------------------------------------- real files


def test_real_sharegpt_json_array():
    file = shared_file("sharegpt_dummy_conversation.json")
    assert count_file(file, "sg", "chat", "auto", None, 10**6) == FileCounts(read=500, kept=500, rejected=0)
    out = list(read_canonical(file, "sg", "chat", "sharegpt", None, 10**6))
    first = out[0][1]
    assert first["id"] == "sg:sharegpt_dummy_conversation.json:index 0"
    assert first["messages"][:2] == [
        user("Who are you?"),
        assistant(
            "I am Vicuna, a language model trained by researchers from Large Model Systems Organization (LMSYS)."
        ),
    ]
    assert json.loads(first["metadata"]) == {"original_id": "identity_0"}
    assert {m["role"] for _, r in out for m in r["messages"]} == {"user", "assistant"}


def test_real_alpaca_seed_tasks_expand_instances():
    file = shared_file("alpaca_seed_tasks.jsonl")
    out = list(read_canonical(file, "seed", "general", "auto", None, 10**6))
    assert len(out) == 175 and all(kind == "kept" for kind, _ in out)
    first = out[0][1]
    assert first["id"] == "seed:alpaca_seed_tasks.jsonl:line 1 instance 0"
    assert first["messages"][0]["content"].startswith("Is there anything I can eat for a breakfast")
    assert first["messages"][1]["content"].startswith("Yes, you can have 1 oatmeal banana protein shake")
    assert json.loads(first["metadata"]) == {"name": "breakfast_suggestion", "original_id": "seed_task_0"}
    with_input = [r for _, r in out if "\n\n" in r["messages"][0]["content"]]
    assert with_input, "some seed tasks have an input, joined below the instruction"


def test_real_mt_bench_questions_are_rejected_as_assistant_less():
    file = shared_file("mt_bench_questions.jsonl")
    out = list(read_canonical(file, "mtb", "general", "auto", None, 10**6))
    assert len(out) == 80
    assert {(kind, row["stage"], row["reason"]) for kind, row in out} == {
        ("rejected", "normalise", "no assistant message: 'turns' holds 2 user prompt(s) and no answers")
    }
    assert out[0][1]["record"] == "line 1" and out[0][1]["example"].startswith('{"question_id": 81')
