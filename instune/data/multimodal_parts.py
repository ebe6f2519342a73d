"""The parts prepare_multimodal writes: each block of image-text records, once its images are checked, is written
by the task that checked them as one part, a file of the same name in filtered/, tokenized/ and dropped/, and
exact dedup then removes the duplicates from the few parts that hold any.

Deduplicating first (as the text pipeline does) needs every record's key before any record can be written, so the
records, images and all, were written to a work directory and read back: on small images that second pass cost as
much as decoding them. Here the one pass writes the outputs and returns only each record's dedup key and part;
the duplicates are found from those keys (raydata.repeated_keys) and taken out of their parts, with their
quarantine rows written first, so a part rewritten twice (a task run again) comes out the same.
"""

from __future__ import annotations

import os
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from instune.data.dedup.exact import HASH_COLUMN, ORDER_COLUMN, STAGE, firsts_duplicated, order_key, text_hash
from instune.data.filters import reject_for_record
from instune.data.rejects import once_name, write_named, write_rejects

PART_COLUMN = "_part"
# Where each record sits in its part: its row in filtered/, and in tokenized/ or dropped/ (the other -1); and the
# rows each of the part's three files had as written, so an edit can tell whether it was already made.
POSITION_COLUMNS = ("row", "tokenized_row", "dropped_row", "filtered_rows", "tokenized_rows", "dropped_rows")
KEYS_SCHEMA = pa.schema([(HASH_COLUMN, pa.int64()), (ORDER_COLUMN, pa.string()), (PART_COLUMN, pa.string()),
                         *[(name, pa.int32()) for name in POSITION_COLUMNS]])


def part_name(ids: list[str]) -> str:
    """The file name of the part holding the records `ids`, the same in filtered/, tokenized/, dropped/ and the
    keys: a task that runs again writes the same files."""
    return once_name("\n".join(ids))


def write_part(table: pa.Table, directory: str, name: str) -> None:
    """`table` as `directory/name` (rejects.write_named); an empty table removes the file."""
    if table.num_rows:
        write_named(table, directory, name)
    elif os.path.exists(os.path.join(directory, name)):
        os.remove(os.path.join(directory, name))


def part_keys(records: list[dict], name: str, tokenized: list[bool]) -> pa.Table:
    """Each record's exact-dedup key and order (dedup/exact.py), the part that holds it and where in the part
    (POSITION_COLUMNS); `tokenized` says which records went to tokenized/ (the others to dropped/), in order.

    Positions, not ids, say which rows to take out: ids name a file by its base name, so two files of one
    source in different directories can give two records of a part the same id."""
    tokenized_rows = np.cumsum(tokenized) - 1
    dropped_rows = np.cumsum(np.logical_not(tokenized)) - 1
    count = len(records)
    n_tokenized = int(sum(tokenized))
    return pa.table({HASH_COLUMN: pa.array([text_hash(r) for r in records], pa.int64()),
                     ORDER_COLUMN: pa.array([order_key(r["id"]) for r in records], pa.string()),
                     PART_COLUMN: pa.array([name] * count, pa.string()),
                     "row": pa.array(np.arange(count), pa.int32()),
                     "tokenized_row": pa.array(np.where(tokenized, tokenized_rows, -1), pa.int32()),
                     "dropped_row": pa.array(np.where(tokenized, -1, dropped_rows), pa.int32()),
                     "filtered_rows": pa.array([count] * count, pa.int32()),
                     "tokenized_rows": pa.array([n_tokenized] * count, pa.int32()),
                     "dropped_rows": pa.array([count - n_tokenized] * count, pa.int32())}, schema=KEYS_SCHEMA)


def duplicate_rows(keys: pa.Table, hashes: np.ndarray, firsts: np.ndarray) -> pa.Table:
    """The rows of `keys` that repeat a key held by a record earlier in id order, with their reason and place.

    `hashes` and `firsts` are dedup/exact.sorted_repeats'."""
    duplicated = firsts_duplicated(keys, hashes, firsts)
    rows = [i for i, first in enumerate(duplicated) if first]
    picked = keys.take(pa.array(rows, pa.int64()))
    reasons = [f"exact duplicate of {duplicated[i]}" for i in rows]
    return pa.table({PART_COLUMN: picked[PART_COLUMN], "reason": pa.array(reasons, pa.string()),
                     **{name: picked[name] for name in POSITION_COLUMNS}})


def _without_rows(directory: str, name: str, rows: set[int], rows_as_written: int) -> None:
    """Rewrite the part `directory/name` without `rows`, unless it no longer has `rows_as_written` rows (the edit
    was made by an earlier attempt of this task)."""
    path = os.path.join(directory, name)
    if not rows or not os.path.exists(path):
        return
    table = pq.read_table(path)
    if table.num_rows != rows_as_written:
        return
    keep = np.ones(table.num_rows, bool)
    keep[sorted(rows)] = False
    write_part(table.filter(pa.array(keep)), directory, name)


def remove_duplicates(batch: pa.Table, out_dir: str, quarantine: str) -> pa.Table:
    """Take the duplicate records of `batch` (duplicate_rows, whole parts only) out of their parts: their
    quarantine rows are written, then tokenized/, dropped/ and last filtered/ are rewritten without them. Runs in a
    Ray task per group of parts; returns the rows removed per part (0 for a part an earlier attempt edited)."""
    by_part: dict[str, list[dict]] = defaultdict(list)
    for row in batch.to_pylist():
        by_part[row[PART_COLUMN]].append(row)
    removed = []
    for name, duplicates in by_part.items():
        counts = duplicates[0]
        filtered_path = os.path.join(out_dir, "filtered", name)
        if not os.path.exists(filtered_path):
            continue
        filtered = pq.read_table(filtered_path)
        if filtered.num_rows != counts["filtered_rows"]:  # filtered/ is edited last: this part is done
            removed.append({PART_COLUMN: name, "removed": 0})
            continue
        records = filtered.take(pa.array([d["row"] for d in duplicates], pa.int64())).to_pylist()
        write_rejects([reject_for_record(r, STAGE, d["reason"]) for r, d in zip(records, duplicates)], quarantine)
        _without_rows(os.path.join(out_dir, "tokenized"), name,
                      {d["tokenized_row"] for d in duplicates if d["tokenized_row"] >= 0}, counts["tokenized_rows"])
        _without_rows(os.path.join(out_dir, "dropped"), name,
                      {d["dropped_row"] for d in duplicates if d["dropped_row"] >= 0}, counts["dropped_rows"])
        _without_rows(os.path.join(out_dir, "filtered"), name, {d["row"] for d in duplicates},
                      counts["filtered_rows"])
        removed.append({PART_COLUMN: name, "removed": len(duplicates)})
    return pa.Table.from_pylist(removed, schema=pa.schema([(PART_COLUMN, pa.string()), ("removed", pa.int64())]))
