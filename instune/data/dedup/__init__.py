"""Deduplication: exact (normalised text hash) and near (MinHash LSH), each global across a Ray Dataset.

Both return (kept records, reject rows); the pure `*_records` versions do the same for plain lists.
"""

from instune.data.dedup.exact import exact_dedup, exact_dedup_records, normalise_text, order_key
from instune.data.dedup.minhash import (
    minhash_signatures,
    near_dedup,
    near_dedup_records,
    optimal_bands,
)

__all__ = [
    "exact_dedup",
    "exact_dedup_records",
    "minhash_signatures",
    "near_dedup",
    "near_dedup_records",
    "normalise_text",
    "optimal_bands",
    "order_key",
]
