"""The data report, written from a manifest and output files laid out by the test (no Ray needed).

The report of a real prepare run is checked in test_prepare.py.
"""

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instune.data.accounting import stage_table
from instune.data.data_report import conversation_chars, write_data_report

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
ENGLISH = ["The river runs past the old mill and into the quiet valley below.",
           "Please water the garden every morning before the sun gets too hot.",
           "Our teacher asked every student to write a letter to the city council.",
           "The market in the village opens early on Saturday and closes at noon."]
FRENCH = ["Le chat est assis sur le tapis et regarde la pluie tomber sur la ville.",
          "Nous avons mangé une très bonne soupe chez ma grand-mère hier soir."]


def conversation(text: str, answer: str = "Yes, of course.") -> list[dict]:
    return [{"role": "system", "content": "You help."}, {"role": "user", "content": text},
            {"role": "assistant", "content": answer}]


@pytest.fixture
def data_dir(tmp_path):
    texts = ENGLISH + FRENCH
    (tmp_path / "filtered").mkdir()
    pq.write_table(pa.table({
        "source": ["a"] * 4 + ["b"] * 2,
        "messages": pa.array([conversation(t) for t in texts], MESSAGES),
        "metadata": ["{}"] * 6,
    }), tmp_path / "filtered" / "part-0.parquet")
    (tmp_path / "train").mkdir()
    pq.write_table(pa.table({"num_tokens": [100, 120, 64]}), tmp_path / "train" / "part-0.parquet")
    rejects = {("a", "normalise", "unknown role N"): 2, ("a", "dedup:exact", "exact duplicate"): 3,
               ("b", "dedup:near", "near-duplicate"): 1, ("a", "read", "malformed JSON: x at column N"): 1}
    read = {"a": 10, "b": 3}
    stages = stage_table(read, rejects)
    sources = {
        "a": {"read": 10, "kept": 4, "rejected": 6, "stages": stages["a"], "rejects": [
            {"stage": "read", "reason": "malformed JSON: x at column N", "count": 1,
             "example_reason": "malformed JSON: x at column 3", "example": '{"messages": [oops'},
            {"stage": "normalise", "reason": "unknown role N", "count": 2, "example_reason": "unknown role 7",
             "example": '{"messages": [{"role": "robot"}]}'},
            {"stage": "dedup:exact", "reason": "exact duplicate", "count": 3,
             "example_reason": "exact duplicate of a:f.jsonl:line 1", "example": "The river runs"}]},
        "b": {"read": 3, "kept": 2, "rejected": 1, "stages": stages["b"], "rejects": [
            {"stage": "dedup:near", "reason": "near-duplicate", "count": 1,
             "example_reason": "near-duplicate of b:g.jsonl:line 2 (jaccard≈0.91)", "example": "Le chat | est"}]},
    }
    manifest = {
        "config": {"data": {"score": None}},
        "sources": sources,
        "mixture": {"weights": {"a": 1.0, "b": 3.0}, "copies_per_record": {"a": 1.0, "b": 4.5},
                    "requested": {"a": 0.25, "b": 0.75},
                    "realised": {"a": {"examples": 4, "fraction": 0.3077}, "b": {"examples": 9, "fraction": 0.6923}}},
        "splits": {"train": {"rows": 3, "examples": 13, "target_tokens": 90, "tokens": 284,
                             "packing_efficiency": 0.7396, "examples_by_source": {"a": 4, "b": 9},
                             "drawn": {"a": 4, "b": 10}, "dropped_total": 1,
                             "dropped": {"b": [{"reason": "N tokens is over max_length N", "count": 1,
                                                "example_reason": "300 tokens is over max_length 128"}]}}},
        "seq_len": 128,
        "seconds": 12.5,
    }
    return tmp_path, manifest


def row(markdown: str, first_cell: str) -> list[str]:
    """The cells of the first table row starting with `first_cell`."""
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r}")


def test_report_holds_counts_rejects_languages_lengths_and_mixture(data_dir):
    directory, manifest = data_dir
    path = write_data_report(directory, manifest, detect_languages=True)
    assert path == directory / "report" / "report.md"
    md = path.read_text()
    assert row(md, "a") == ["a", "10", "4", "6", "0", "40"]  # read, kept, rejected (0 at tokenization), kept %
    assert "| normalise | 2 | 0 |" in md and "| dedup:exact | 3 | 0 |" in md
    # Rejects by reason, each with its example; a pipe in an example cannot break the table.
    assert "| a | normalise | unknown role N | 2 | `{\"messages\": [{\"role\": \"robot\"}]}` |" in md
    assert "`Le chat \\| est`" in md
    dup_section = md.split("## Duplicates found")[1].split("##")[0]
    assert row(dup_section, "a")[1:] == ["3", "0"] and row(dup_section, "b")[1:] == ["0", "1"]
    languages = md.split("## Language mix")[1].split("##")[0]
    assert row(languages, "en")[1] == "4" and row(languages, "fr")[1] == "2"
    longest = max(len("You help.") + len(t) + len("Yes, of course.") for t in ENGLISH + FRENCH)
    assert f"max {longest:,}" in md
    assert "train: 3 rows hold 13 examples" in md and "packing efficiency 74.0%" in md
    mixture = md.split("## Mixture")[1].split("##")[0]
    assert row(mixture, "b") == ["b", "3.0", "75.0%", "9", "69.2%", "4.5"]
    assert "| train | b | N tokens is over max_length N | 1 | 300 tokens is over max_length 128 |" in md
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert set(images) == {"stages.png", "rejects.png", "languages.png", "conversation_chars.png",
                           "train_packed_tokens.png", "mixture.png"}
    for name in images:
        assert (directory / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_language_section_without_the_language_filter(data_dir):
    directory, manifest = data_dir
    md = write_data_report(directory, manifest, detect_languages=False).read_text()
    assert "Language mix" not in md and not (directory / "report" / "languages.png").exists()


def test_streamed_data_has_no_realised_mixture(data_dir):
    directory, manifest = data_dir
    manifest = dict(manifest, splits={}, mixture=dict(manifest["mixture"], realised={}))
    md = write_data_report(directory, manifest, detect_languages=False).read_text()
    assert "no realised mixture is recorded" in md and "tokens per packed row" not in md


def test_conversation_chars_sums_every_message():
    batch = pa.table({"messages": pa.array([conversation("abc", "de"), [{"role": "user", "content": "ü"}]],
                                           MESSAGES)})
    assert conversation_chars(batch).tolist() == [len("You help.") + 3 + 2, 1]
    assert json.dumps(conversation_chars(pa.table({"messages": pa.array([], MESSAGES)})).tolist()) == "[]"


def test_records_dropped_at_tokenization_count_as_rejected():
    from instune.data.accounting import source_table

    columns, rows = source_table({"a": {"read": 10, "kept": 6, "rejected": 4, "dropped_at_tokenization": 2},
                                  "b": {"read": 0, "kept": 0, "rejected": 0}})
    assert columns == ["source", "read", "kept", "rejected", "of which at tokenization", "kept %"]
    assert rows == [["a", 10, 4, 6, 2, 40.0], ["b", 0, 0, 0, 0, None]]
