"""Exact deduplication: records whose normalised text (lower-cased, whitespace collapsed) is identical.

The first record in id order is kept. Ids are compared in natural order ("line 9" before "line 10"),
and the Ray version is global: every record's (text hash, order key) pair is grouped across all blocks
with a hash aggregation, and only the (small) table of duplicated hashes comes back to the driver.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pyarrow as pa
import ray

from instune.data.filters import mark_table, reject_for_record, split_marked
from instune.data.raydata import persist, repeated_keys
from instune.data.schema import record_text

STAGE = "dedup:exact"
HASH_COLUMN = "_text_hash"
ORDER_COLUMN = "_order"
_DIGITS = re.compile(r"\d+")
_ORDER_SEPARATOR = "\x1f"


def normalise_text(text: str) -> str:
    """Lower-cased, with every run of whitespace collapsed to one space."""
    return " ".join(text.lower().split())


def text_hash(record: dict) -> int:
    """A signed 64-bit hash of the record's normalised text (stable across processes), and of its images'
    bytes for an image-text record: the same question about two different images is not a duplicate."""
    key = normalise_text(record_text(record))
    if record.get("images_digest"):  # multimodal_formats.to_multimodal; text records have none
        key += "\0" + record["images_digest"]
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def order_key(record_id: str) -> str:
    """A string that sorts ids in natural order (digit runs zero-padded) and ends with the id itself."""
    padded = _DIGITS.sub(lambda m: m.group().zfill(12), record_id)
    return f"{padded}{_ORDER_SEPARATOR}{record_id}"


def id_of(key: str) -> str:
    """The record id inside an `order_key`."""
    return key.rpartition(_ORDER_SEPARATOR)[2]


def exact_dedup_records(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(kept records in input order, reject rows) for a plain list."""
    first_of: dict[int, str] = {}
    for record in sorted(records, key=lambda r: order_key(r["id"])):
        first_of.setdefault(text_hash(record), record["id"])
    kept, rejects = [], []
    for record in records:
        first = first_of[text_hash(record)]
        if first == record["id"]:
            kept.append(record)
        else:
            rejects.append(reject_for_record(record, STAGE, f"exact duplicate of {first}"))
    return kept, rejects


def _add_keys(batch: pa.Table) -> pa.Table:
    rows = batch.to_pylist()
    batch = batch.append_column(HASH_COLUMN, pa.array([text_hash(r) for r in rows], pa.int64()))
    return batch.append_column(ORDER_COLUMN, pa.array([order_key(r["id"]) for r in rows], pa.string()))


def sorted_repeats(repeated: pa.Table | None) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, the first order key of each) from raydata.repeated_keys' answer, sorted by hash for
    `firsts_duplicated`; empty arrays for None (no key repeats)."""
    if repeated is None:
        return np.zeros(0, np.int64), np.zeros(0, object)
    order = np.argsort(repeated[HASH_COLUMN].to_numpy())
    return repeated[HASH_COLUMN].to_numpy()[order], np.asarray(repeated["first"].to_pylist(), dtype=object)[order]


def firsts_duplicated(keys: pa.Table, hashes: np.ndarray, firsts: np.ndarray) -> list[str | None]:
    """For each row of `keys` (HASH_COLUMN, ORDER_COLUMN): the id of the record earlier in id order that it
    duplicates, or None for a row that is kept. `hashes` and `firsts` are sorted_repeats'."""
    own_hash = keys[HASH_COLUMN].to_numpy()
    own_order = keys[ORDER_COLUMN].to_pylist()
    slot = np.clip(np.searchsorted(hashes, own_hash), 0, max(len(hashes) - 1, 0))
    duplicated = (hashes[slot] == own_hash) if len(hashes) else np.zeros(len(own_hash), bool)
    return [id_of(firsts[s]) if dup and firsts[s] != order else None
            for dup, s, order in zip(duplicated, slot, own_order)]


def _mark_duplicates(batch: pa.Table, hashes: np.ndarray, firsts: np.ndarray) -> pa.Table:
    return mark_table(batch, [(STAGE, f"exact duplicate of {first}") if first else None
                              for first in firsts_duplicated(batch, hashes, firsts)])


def exact_dedup(ds: ray.data.Dataset, work_dir: str | None = None, quarantine: str | None = None
                ) -> tuple[ray.data.Dataset, ray.data.Dataset | None]:
    """(kept records, reject rows): one record per normalised text across the whole dataset.

    The keyed records are computed once (written to `work_dir`, see raydata.persist); both outputs are lazy
    views over them. With a `quarantine` directory the rejects are written there instead (filters.split_marked).
    """
    keyed = persist(ds.map_batches(_add_keys, batch_format="pyarrow"), work_dir)
    hashes, firsts = sorted_repeats(repeated_keys(keyed, work_dir, HASH_COLUMN, ORDER_COLUMN))
    # fn_kwargs travel inside the operator's map transformer, which Ray puts in the object store once.
    marked = keyed.map_batches(
        _mark_duplicates,
        fn_kwargs={"hashes": hashes, "firsts": firsts},
        batch_format="pyarrow",
    )
    return split_marked(marked, drop=[HASH_COLUMN, ORDER_COLUMN], quarantine=quarantine)


__all__ = ["exact_dedup", "exact_dedup_records", "normalise_text", "order_key", "text_hash"]
