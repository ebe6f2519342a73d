"""How the data stage uses Ray Data: the Parquet reader, shuffles, stage outputs computed once, global keys.

Two Ray 2.60 defaults are overridden, the Parquet reader and the shuffle behind groupby: both start a pool of
actors per operation, seconds of fixed cost each time. The pipeline runs many small operations (every
stage's output is read back, exact dedup groups), so on small data, in tests and in every sweep trial,
those seconds were most of the wall time. A stage output read twice is written to disk (`persist`), and the
keys that repeat across the whole corpus (dedup) are found from two small columns (`repeated_keys`).
"""

from __future__ import annotations

from pathlib import Path


def read_parquet(path: str | Path, filesystem=None, **options):
    """`ray.data.read_parquet` through Ray's V1 Parquet reader.

    Ray 2.60's default (V2) reader lists files through a pool of freshly started footer-reader actors on
    every read: 1.5-2 s of fixed cost per read on a 2-core machine, against 0.3 s for V1. Prepare, training
    and every sweep trial read many small outputs, so that cost was most of their wall time on small data.
    The reader is chosen when the dataset is built; the caller's DataContext is left as it was. `filesystem`
    (a pyarrow filesystem, `path` then on it) is for cloud storage: see instune.storage.resolve.
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    previous = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(str(path), filesystem=filesystem, **options)
    finally:
        context.use_datasource_v2 = previous


def task_shuffle(ds):
    """`ds`, set to shuffle (groupby, random_shuffle) with tasks, sort-based and pull-based.

    The default hash shuffle starts its aggregator actors for every groupby: 5-6 s for a thousand rows on a
    2-core machine, against 0.7 s with tasks. The setting lives in the dataset's own DataContext, so
    datasets derived from `ds` inherit it and the caller's context is untouched.
    """
    from ray.data.context import ShuffleStrategy

    ds.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    return ds


def cluster_cpus() -> int:
    """CPUs of the Ray cluster (at least 1): the tasks that can run at once, and the partitions of a groupby.

    A groupby has one partition per CPU, not one per input block: a sort shuffle makes (map tasks x partitions)
    pieces, so on a corpus read into hundreds of blocks, partitions by block count made a groupby of a few MB
    of keys take 100 s on 2 CPUs.
    """
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def has_parquet(directory: str | Path) -> bool:
    """Whether a local `directory` holds Parquet files (Ray writes none for a dataset without rows)."""
    return Path(directory).is_dir() and any(Path(directory).glob("*.parquet"))


def persist(ds, directory: str | Path | None):
    """`ds`, computed once for several readers.

    With a `directory`, the rows are written there as Parquet and read back lazily: a corpus larger than the
    object store then streams through it, where `materialize` would hold (or spill) every block at once, so
    memory grew with the corpus. Without one, the dataset is materialized (small data, tests).
    """
    import ray.data

    if directory is None:
        return ds.materialize()
    ds.write_parquet(str(directory))
    if not has_parquet(directory):
        return ray.data.from_items([])
    return read_parquet(directory)


# Up to this many rows of keys (tens of bytes each) are grouped in the driver; more go through a Ray shuffle.
# On 2 CPUs Ray grouped 150k keys in 14 s (90 s over the few hundred blocks a corpus is read into); the
# driver in well under a second.
DRIVER_GROUP_MAX_ROWS = 20_000_000


def repeated_keys(ds, directory: str | Path | None, key: str, order: str,
                  max_driver_rows: int = DRIVER_GROUP_MAX_ROWS):
    """Every value of `key` that two rows or more of `ds` hold, with the rows' count ("count") and smallest
    `order` ("first"), as one Arrow table (None when no value repeats). Global over all blocks and nodes.

    `ds` is what `persist(..., directory)` returned: with a directory the two columns are read from its files
    alone, and grouped here when there are at most `max_driver_rows`.
    """
    import pyarrow as pa
    from ray.data.aggregate import Count, Min

    if directory is not None:
        import pyarrow.dataset as pads

        if not has_parquet(directory):
            return None
        files = pads.dataset(str(directory), format="parquet")
        if files.count_rows() <= max_driver_rows:
            repeated = _repeated_here(files.to_table(columns=[key, order]), key, order)
            # Arrow's allocator keeps freed memory for reuse; hand the key table's back, or the driver holds it
            # for the rest of the run.
            pa.default_memory_pool().release_unused()
            return repeated
        ds = read_parquet(directory, columns=[key, order], override_num_blocks=cluster_cpus())
    groups = (task_shuffle(ds.select_columns([key, order]))
              .groupby(key, num_partitions=cluster_cpus())
              .aggregate(Count(alias_name="count"), Min(order, alias_name="first"))
              .map_batches(_repeated, batch_format="pyarrow"))
    return collect(groups)


def _repeated_here(table, key: str, order: str):
    """`repeated_keys` of one Arrow table, with numpy: sort rows by (key, rank of order), then runs of equal keys.

    pyarrow's group_by with a string min took 900 MB for 1.3M band rows; this takes a few arrays of ints.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if not table.num_rows:
        return None
    keys = table[key].to_numpy()
    ranked = pc.unique(table[order])
    ranked = ranked.take(pc.sort_indices(ranked))  # byte order, as Ray's Min and Python's min compare strings
    ranks = pc.index_in(table[order], value_set=ranked).to_numpy()
    rows = np.lexsort((ranks, keys))
    keys, ranks = keys[rows], ranks[rows]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    counts = np.diff(np.r_[starts, len(keys)])
    repeated = counts > 1
    if not repeated.any():
        return None
    return pa.table({key: pa.array(keys[starts][repeated]), "count": pa.array(counts[repeated], pa.int64()),
                     "first": ranked.take(pa.array(ranks[starts][repeated]))})


def _repeated(groups):
    import pyarrow.compute as pc

    return groups.filter(pc.greater(groups["count"], 1))


def collect(ds):
    """The whole (small) dataset as one Arrow table in the driver, or None when it has no rows."""
    import pyarrow as pa

    tables = [t for t in ds.iter_batches(batch_size=None, batch_format="pyarrow") if t.num_rows]
    return pa.concat_tables(tables) if tables else None
