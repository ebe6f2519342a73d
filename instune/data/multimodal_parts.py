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

import hashlib
import os
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from instune.data.dedup.exact import HASH_COLUMN, ORDER_COLUMN, STAGE, id_of, order_key, text_hash
from instune.data.filters import record_location, reject_for_record

PART_COLUMN = "_part"
KEYS_SCHEMA = pa.schema([(HASH_COLUMN, pa.int64()), (ORDER_COLUMN, pa.string()), (PART_COLUMN, pa.string())])
PART_DIRS = ("filtered", "tokenized", "dropped")


def part_name(ids: list[str]) -> str:
    """The file name of the part holding the records `ids` (the same in each of PART_DIRS): a task that runs
    again writes the same files."""
    return hashlib.blake2b("\n".join(ids).encode(), digest_size=16).hexdigest() + ".parquet"


def write_part(table: pa.Table, directory: str, name: str) -> None:
    """`table` as `directory/name`, under a hidden name first and then renamed; an empty table removes the file."""
    path = os.path.join(directory, name)
    if not table.num_rows:
        if os.path.exists(path):
            os.remove(path)
        return
    os.makedirs(directory, exist_ok=True)
    partial = os.path.join(directory, f".{name}.{os.getpid()}.partial")
    pq.write_table(table, partial)
    os.replace(partial, path)


def part_keys(records: list[dict], name: str) -> pa.Table:
    """Each record's exact-dedup key and order (dedup/exact.py) and the part that holds it."""
    return pa.table({HASH_COLUMN: pa.array([text_hash(r) for r in records], pa.int64()),
                     ORDER_COLUMN: pa.array([order_key(r["id"]) for r in records], pa.string()),
                     PART_COLUMN: pa.array([name] * len(records), pa.string())}, schema=KEYS_SCHEMA)


def duplicate_rows(keys: pa.Table, hashes: np.ndarray, firsts: np.ndarray) -> pa.Table:
    """The rows of `keys` that repeat a key held by a record earlier in id order ("first"), with their reason.

    `hashes` (sorted) and `firsts` are raydata.repeated_keys' answer as arrays."""
    own = keys[HASH_COLUMN].to_numpy()
    slot = np.clip(np.searchsorted(hashes, own), 0, max(len(hashes) - 1, 0))
    duplicated = hashes[slot] == own if len(hashes) else np.zeros(len(own), bool)
    orders = keys[ORDER_COLUMN].to_pylist()
    rows = [i for i, (dup, s, order) in enumerate(zip(duplicated, slot, orders)) if dup and firsts[s] != order]
    picked = keys.take(pa.array(rows, pa.int64()))
    reasons = [f"exact duplicate of {id_of(firsts[slot[i]])}" for i in rows]
    return pa.table({"id": [id_of(o) for o in picked[ORDER_COLUMN].to_pylist()],
                     PART_COLUMN: picked[PART_COLUMN], "reason": pa.array(reasons, pa.string())})


def remove_duplicates(batch: pa.Table, out_dir: str, quarantine: str) -> pa.Table:
    """Take the duplicate records of `batch` (duplicate_rows, one part each row) out of their parts: their
    quarantine rows are written, then tokenized/, dropped/ and last filtered/ are rewritten without them. Runs in a
    Ray task per group of parts; returns the rows removed per part."""
    from instune.data.rejects import write_rejects

    by_part: dict[str, dict[str, str]] = defaultdict(dict)
    for row in batch.to_pylist():
        by_part[row[PART_COLUMN]][row["id"]] = row["reason"]
    removed = []
    for name, reasons in by_part.items():
        filtered_path = os.path.join(out_dir, "filtered", name)
        if not os.path.exists(filtered_path):
            continue
        filtered = pq.read_table(filtered_path)
        duplicate = pc.is_in(filtered["id"], value_set=pa.array(list(reasons), pa.string()))
        records = filtered.filter(duplicate).to_pylist()
        write_rejects([reject_for_record(r, STAGE, reasons[r["id"]]) for r in records], quarantine)
        tokenized_path = os.path.join(out_dir, "tokenized", name)
        if os.path.exists(tokenized_path):
            tokenized = pq.read_table(tokenized_path)
            write_part(tokenized.filter(pc.invert(pc.is_in(tokenized["id"], value_set=filtered["id"].filter(
                duplicate)))), os.path.join(out_dir, "tokenized"), name)
        dropped_path = os.path.join(out_dir, "dropped", name)
        if os.path.exists(dropped_path):
            dropped = pq.read_table(dropped_path)
            # A part can hold records of two sources (blocks are cut across files), whose files may share a name.
            gone = {(r["source"], *record_location(r)) for r in records}
            keep = [row not in gone for row in zip(dropped["source"].to_pylist(), dropped["file"].to_pylist(),
                                                   dropped["record"].to_pylist())]
            write_part(dropped.filter(pa.array(keep, pa.bool_())), os.path.join(out_dir, "dropped"), name)
        write_part(filtered.filter(pc.invert(duplicate)), os.path.join(out_dir, "filtered"), name)
        removed.append({PART_COLUMN: name, "removed": len(records)})
    return pa.Table.from_pylist(removed, schema=pa.schema([(PART_COLUMN, pa.string()), ("removed", pa.int64())]))
