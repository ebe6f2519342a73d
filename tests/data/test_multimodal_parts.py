"""Exact dedup on written parts (multimodal_parts.py): duplicates leave filtered/, tokenized/ and dropped/ for the
quarantine, every other row stays, and a second run (a retried task) changes nothing."""

import pyarrow as pa
import pyarrow.parquet as pq

from instune.data.dedup.exact import HASH_COLUMN, ORDER_COLUMN, sorted_repeats
from instune.data.filters import reject_for_record
from instune.data.multimodal_parts import (PART_COLUMN, duplicate_rows, part_keys, part_name, remove_duplicates,
                                           write_part)
from instune.data.prepare_multimodal import MULTIMODAL_RECORD_SCHEMA, TOKENIZED_SCHEMA
from instune.data.raydata import _repeated_here
from instune.data.rejects import REJECT_SCHEMA


def record(i, answer, source="s", file="c.json"):
    return {"id": f"{source}:{file}:{i}", "source": source, "domain": "d", "metadata": "{}", "images": [b"png"],
            "images_digest": "ab", "messages": [{"role": "user", "content": "<image> colour?"},
                                                {"role": "assistant", "content": answer}]}


def write(tmp_path, records, tokenized):
    """`records` written as one part as write_block writes it (`tokenized`: which went to tokenized/); its keys."""
    name = part_name([r["id"] for r in records])
    rows = [{"id": r["id"], "source": r["source"], "domain": "d", "metadata": "{}", "input_ids": [1], "labels": [1],
             "pixels": [], "pixel_map": [], "pixel_values": [0.5], "image_shape": [1, 1, 1, 1]}
            for r, t in zip(records, tokenized) if t]
    drops = [reject_for_record(r, "tokenize", "too long") for r, t in zip(records, tokenized) if not t]
    write_part(pa.Table.from_pylist(records, schema=MULTIMODAL_RECORD_SCHEMA), str(tmp_path / "filtered"), name)
    write_part(pa.Table.from_pylist(rows, schema=TOKENIZED_SCHEMA), str(tmp_path / "tokenized"), name)
    write_part(pa.Table.from_pylist(drops, schema=REJECT_SCHEMA), str(tmp_path / "dropped"), name)
    return part_keys(records, name, tokenized)


def duplicates_of(keys):
    return duplicate_rows(keys, *sorted_repeats(_repeated_here(keys, HASH_COLUMN, ORDER_COLUMN)))


def test_duplicates_leave_every_output_of_their_part(tmp_path):
    # Records 0 and 3 are the same; 1 and 10 too (10 follows 1 in natural id order, though not as strings).
    records = [record(0, "red"), record(1, "a very long answer"), record(2, "blue"), record(3, "Red"),
               record(10, "a  very long answer")]
    keys = write(tmp_path, records, [True, False, True, True, False])  # 1 and 10 were too long: dropped
    duplicates = duplicates_of(keys)
    assert sorted(zip(duplicates["row"].to_pylist(), duplicates["reason"].to_pylist())) == [
        (3, "exact duplicate of s:c.json:0"), (4, "exact duplicate of s:c.json:1")]
    assert duplicates["row"].to_pylist() == [3, 4]  # in key order
    assert (duplicates["tokenized_row"].to_pylist(), duplicates["dropped_row"].to_pylist()) == ([2, -1], [-1, 1])

    name = keys[PART_COLUMN][0].as_py()
    for attempt in range(2):  # the second run finds the part edited and leaves it
        removed = remove_duplicates(duplicates, str(tmp_path), str(tmp_path / "quarantine"))
        assert removed.to_pylist() == [{PART_COLUMN: name, "removed": 2 if attempt == 0 else 0}]
        assert pq.read_table(tmp_path / "filtered")["id"].to_pylist() == ["s:c.json:0", "s:c.json:1", "s:c.json:2"]
        assert pq.read_table(tmp_path / "tokenized")["id"].to_pylist() == ["s:c.json:0", "s:c.json:2"]
        assert pq.read_table(tmp_path / "dropped")["record"].to_pylist() == ["index 1"]
        quarantine = pq.read_table(tmp_path / "quarantine").to_pylist()
        assert sorted((r["record"], r["stage"], r["reason"]) for r in quarantine) == [
            ("index 10", "dedup:exact", "exact duplicate of s:c.json:1"),
            ("index 3", "dedup:exact", "exact duplicate of s:c.json:0")]


def test_rows_are_taken_out_by_position_not_by_id(tmp_path):
    # Sources a and b both read a file named c.json, and source a two files named x.json in different
    # directories: equal ids in one part. Only the duplicate (a's second x.json record 1, a copy of a's record 0)
    # leaves, and only its own row of dropped/.
    records = [record(0, "long", "a", "c.json"), record(1, "x", "b", "c.json"), record(1, "other", "a", "x.json"),
               record(1, "Long", "a", "x.json")]
    keys = write(tmp_path, records, [False, False, True, False])
    duplicates = duplicates_of(keys)
    assert duplicates["row"].to_pylist() == [3]
    remove_duplicates(duplicates, str(tmp_path), str(tmp_path / "quarantine"))
    filtered = pq.read_table(tmp_path / "filtered").to_pylist()
    assert [(r["source"], r["id"], r["messages"][1]["content"]) for r in filtered] == [
        ("a", "a:c.json:0", "long"), ("b", "b:c.json:1", "x"), ("a", "a:x.json:1", "other")]
    assert pq.read_table(tmp_path / "tokenized")["id"].to_pylist() == ["a:x.json:1"]
    assert sorted((r["source"], r["record"]) for r in pq.read_table(tmp_path / "dropped").to_pylist()) == [
        ("a", "index 0"), ("b", "index 1")]
    assert [r["reason"] for r in pq.read_table(tmp_path / "quarantine").to_pylist()] == [
        "exact duplicate of a:c.json:0"]


def test_a_part_left_empty_is_removed(tmp_path):
    name = part_name(["x"])
    write_part(pa.table({"id": ["x"]}), str(tmp_path), name)
    write_part(pa.table({"id": pa.array([], pa.string())}), str(tmp_path), name)
    assert not list(tmp_path.iterdir())
