"""Two Ray Data defaults instune overrides: the Parquet reader and the shuffle behind groupby.

Both defaults of Ray 2.60 start a pool of actors per operation, seconds of fixed cost each time. The
pipeline runs many small operations (every stage's output is read back, both dedup stages group), so on
small data, in tests and in every sweep trial, those seconds were most of the wall time.
"""

from __future__ import annotations

from pathlib import Path


def read_parquet(path: str | Path, filesystem=None):
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
        return ray.data.read_parquet(str(path), filesystem=filesystem)
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
