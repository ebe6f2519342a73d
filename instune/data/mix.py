"""The mixing arithmetic: how many copies of each record a mixture of given source weights and size takes, and
which records a split draws. Every draw is a hash of the record's id and the seed, so it is the same on every
worker and every run, and needs no pass over the data to coordinate."""

from __future__ import annotations

import hashlib

import pyarrow as pa

from instune.errors import UserError


def unit_hash(seed: int, key: str) -> float:
    """A reproducible uniform number in [0, 1) for `key`, the same on every worker and every run."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def mixture_copies(kept: dict[str, int], weights: dict[str, float], size: int | None) -> dict[str, float]:
    """Copies of each record per source so that the mixture has `size` records in the ratio of `weights`.

    A source smaller than its share is upsampled (copies > 1); no `size` keeps every record once.
    """
    if size is None:
        return {s: (1.0 if weights[s] > 0 else 0.0) for s in kept}
    total = sum(weights[s] for s in kept if kept[s])
    if total == 0:
        raise UserError("data.sources: every source with records has weight 0")
    return {s: (size * weights[s] / total / kept[s] if kept[s] else 0.0) for s in kept}


def requested_fractions(kept: dict[str, int], weights: dict[str, float], size: int | None) -> dict[str, float]:
    """The share of the mixture each source is expected to hold: by weight with a size, by records without."""
    copies = mixture_copies(kept, weights, size)
    expected = {s: kept[s] * copies[s] for s in kept}
    total = sum(expected.values())
    return {s: (expected[s] / total if total else 0.0) for s in kept}


def copies_drawn(record_id: str, copies: float, seed: int) -> int:
    """Copies of one record in the mixture: the whole part of `copies`, plus one with the fraction's chance."""
    whole = int(copies)
    return whole + (1 if unit_hash(seed, record_id) < copies - whole else 0)


def in_validation(record_id: str, seed: int, validation_fraction: float) -> bool:
    return unit_hash(seed + 1, record_id) < validation_fraction


def draw_batch(batch: pa.Table, split: str, copies_by_source: dict[str, float], seed: int,
               validation_fraction: float) -> pa.Table:
    """The batch's records that belong to `split`, each repeated as often as the mixture draws it (train),
    or once (validation), with a `copy` column numbering the repeats."""
    take, copy = [], []
    for row, (record_id, source) in enumerate(zip(batch["id"].to_pylist(), batch["source"].to_pylist())):
        held_out = bool(validation_fraction) and in_validation(record_id, seed, validation_fraction)
        if held_out != (split == "validation"):
            continue
        n = 1 if held_out else copies_drawn(record_id, copies_by_source[source], seed)
        take += [row] * n
        copy += range(n)
    return batch.take(pa.array(take, pa.int64())).append_column("copy", pa.array(copy, pa.int64()))


def mixture_summary(kept: dict[str, int], mix: dict, copies: dict[str, float], splits: dict) -> dict:
    """The manifest's "mixture": weights, copies per record, and each source's share requested and realised
    (examples in the train split; none when phase 2 is left to training)."""
    realised = splits.get("train", {}).get("examples_by_source", {})
    realised_total = sum(realised.values())
    return {
        "weights": mix["weights"],
        "copies_per_record": copies,
        "requested": requested_fractions(kept, mix["weights"], mix["size"]),
        "realised": {s: {"examples": realised.get(s, 0),
                         "fraction": round(realised.get(s, 0) / realised_total, 6) if realised_total else 0.0}
                     for s in kept},
    }
