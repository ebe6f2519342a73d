"""The shuffle of phase 2's train mixture: global (one all-to-all shuffle) or windowed (bounded memory).

A global `random_shuffle` is a barrier that holds the whole drawn mixture (in the object store, spilled past
its cap) plus the shuffle's pieces, so prepare's peak memory grew with the corpus (peak PSS 4N/N was 1.45).
The windowed shuffle streams: files are read in a seeded random order, and rows are permuted within windows of
`window_rows` consecutive rows, so memory follows the window, not the corpus. Sources still interleave (a
window spans several files, and the file order is random), but two records far apart in the corpus never
swap, which is the price of the bound. It is deterministic: the order of rows is kept through the pipeline
and each window's permutation is seeded by the seed and the window's first id.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

SHUFFLES = ("global", "windowed")


def shuffle_rows(batch: pa.Table, seed: int) -> pa.Table:
    """`batch` with its rows in a random order that depends only on `seed` and the rows' ids."""
    if batch.num_rows < 2:
        return batch
    digest = hashlib.blake2b(f"{seed}:{batch['id'][0].as_py()}".encode(), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    return batch.take(pa.array(rng.permutation(batch.num_rows)))


def windowed_shuffle(ds, seed: int, window_rows: int):
    """`ds` with rows permuted within windows of `window_rows` consecutive rows, order kept between them."""
    ds.context.execution_options.preserve_order = True  # the dataset's own context: windows are reproducible
    return ds.map_batches(shuffle_rows, batch_size=window_rows, batch_format="pyarrow", fn_kwargs={"seed": seed})


def shuffled(ds, shuffle: str, seed: int, window_rows: int):
    """The train mixture `ds` shuffled as `shuffle` ("global" or "windowed") says."""
    assert shuffle in SHUFFLES, f"shuffle must be one of {SHUFFLES}, got {shuffle!r}"
    if shuffle == "global":
        # Ray Data spills the shuffle to disk when it outgrows the object store.
        return ds.random_shuffle(seed=seed)
    return windowed_shuffle(ds, seed, window_rows)
