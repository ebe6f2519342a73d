"""Exact dedup on written parts (multimodal_parts.py): duplicates leave filtered/, tokenized/ and dropped/ for the
quarantine, every other row stays, and a second run (a retried task) changes nothing."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from instune.data.dedup.exact import HASH_COLUMN, ORDER_COLUMN
from instune.data.filters import reject_for_record
from instune.data.multimodal_parts import (PART_COLUMN, duplicate_rows, part_keys, part_name, remove_duplicates,
                                           write_part)
from instune.data.prepare_multimodal import MULTIMODAL_RECORD_SCHEMA, TOKENIZED_SCHEMA
from instune.data.raydata import _repeated_here
from instune.data.rejects import REJECT_SCHEMA


def record(i, answer):
    return {"id": f"s:c.json:{i}", "source": "s", "domain": "d", "metadata": "{}", "images": [b"png"],
            "images_digest": "ab", "messages": [{"role": "user", "content": "<image> colour?"},
                                                {"role": "assistant", "content": answer}]}


def test_duplicates_leave_every_output_of_their_part(tmp_path):
    # Records 0 and 3 are the same; 1 and 10 too (10 follows 1 in natural id order, though not as strings).
    records = [record(0, "red"), record(1, "a very long answer"), record(2, "blue"), record(3, "Red"),
               record(10, "a  very long answer")]
    filtered = pa.Table.from_pylist(records, schema=MULTIMODAL_RECORD_SCHEMA)
    tokenized_ids = ["s:c.json:0", "s:c.json:2", "s:c.json:3"]  # 1 and 10 were too long: dropped
    tokenized = pa.Table.from_pylist([{"id": i, "source": "s", "domain": "d", "metadata": "{}", "input_ids": [1],
                                       "labels": [1], "pixel_values": [0.5], "image_shape": [1, 1, 1, 1]}
                                      for i in tokenized_ids], schema=TOKENIZED_SCHEMA)
    dropped = pa.Table.from_pylist([reject_for_record(r, "tokenize", "too long") for r in (records[1], records[4])],
                                   schema=REJECT_SCHEMA)
    name = part_name([r["id"] for r in records])
    for directory, table in (("filtered", filtered), ("tokenized", tokenized), ("dropped", dropped)):
        write_part(table, str(tmp_path / directory), name)

    keys = part_keys(records, name)
    repeated = _repeated_here(keys, HASH_COLUMN, ORDER_COLUMN)
    order = np.argsort(repeated[HASH_COLUMN].to_numpy())
    duplicates = duplicate_rows(keys, repeated[HASH_COLUMN].to_numpy()[order],
                                np.asarray(repeated["first"].to_pylist(), dtype=object)[order])
    assert sorted(zip(duplicates["id"].to_pylist(), duplicates["reason"].to_pylist())) == [
        ("s:c.json:10", "exact duplicate of s:c.json:1"), ("s:c.json:3", "exact duplicate of s:c.json:0")]
    assert set(duplicates[PART_COLUMN].to_pylist()) == {name}

    for attempt in range(2):  # the second run finds nothing left to remove
        removed = remove_duplicates(duplicates, str(tmp_path), str(tmp_path / "quarantine"))
        assert removed.to_pylist() == [{PART_COLUMN: name, "removed": 2 if attempt == 0 else 0}]
        assert pq.read_table(tmp_path / "filtered")["id"].to_pylist() == ["s:c.json:0", "s:c.json:1", "s:c.json:2"]
        assert pq.read_table(tmp_path / "tokenized")["id"].to_pylist() == ["s:c.json:0", "s:c.json:2"]
        assert pq.read_table(tmp_path / "dropped")["record"].to_pylist() == ["index 1"]
        quarantine = pq.read_table(tmp_path / "quarantine").to_pylist()
        assert sorted((r["record"], r["stage"], r["reason"]) for r in quarantine) == [
            ("index 10", "dedup:exact", "exact duplicate of s:c.json:1"),
            ("index 3", "dedup:exact", "exact duplicate of s:c.json:0")]


def test_a_part_left_empty_is_removed(tmp_path):
    name = part_name(["x"])
    write_part(pa.table({"id": ["x"]}), str(tmp_path), name)
    write_part(pa.table({"id": pa.array([], pa.string())}), str(tmp_path), name)
    assert not list(tmp_path.iterdir())


def test_a_duplicate_leaves_only_its_own_sources_drop(tmp_path):
    # Sources a and b both read a file named c.json; their records 0 share a part. a's record 1 duplicates a's
    # record 0 and was dropped; b's record 1 was dropped too and is no duplicate: it stays in dropped/.
    def own(source, i, answer):
        return {**record(i, answer), "id": f"{source}:c.json:{i}", "source": source}

    records = [own("a", 0, "long"), own("a", 1, "Long"), own("b", 0, "x"), own("b", 1, "y")]
    name = part_name([r["id"] for r in records])
    write_part(pa.Table.from_pylist(records, schema=MULTIMODAL_RECORD_SCHEMA), str(tmp_path / "filtered"), name)
    write_part(pa.Table.from_pylist([reject_for_record(r, "tokenize", "too long") for r in records],
                                    schema=REJECT_SCHEMA), str(tmp_path / "dropped"), name)
    duplicates = pa.table({"id": ["a:c.json:1"], PART_COLUMN: [name], "reason": ["exact duplicate of a:c.json:0"]})
    remove_duplicates(duplicates, str(tmp_path), str(tmp_path / "quarantine"))
    left = pq.read_table(tmp_path / "dropped").to_pylist()
    assert sorted((r["source"], r["record"]) for r in left) == [("a", "index 0"), ("b", "index 0"), ("b", "index 1")]
