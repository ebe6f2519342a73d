"""instune's Ray Data choices: the V1 Parquet reader and task-based shuffles, set per dataset, never on the
caller's DataContext; small prepared splits are cached in the object store."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import ray.data
from ray.data.context import ShuffleStrategy
from ray.data.dataset import MaterializedDataset

from instune import stages
from instune.data.raydata import read_parquet, task_shuffle


@pytest.fixture
def split_dir(tmp_path):
    for part in range(3):
        pq.write_table(pa.table({"id": list(range(part * 10, part * 10 + 10)), "key": [i % 4 for i in range(10)]}),
                       tmp_path / f"part-{part}.parquet")
    return tmp_path


def test_read_parquet_reads_every_row_and_leaves_the_callers_context_alone(local_ray, split_dir):
    context = ray.data.DataContext.get_current()
    before = (context.use_datasource_v2, context.shuffle_strategy)
    ds = read_parquet(split_dir)
    assert sorted(r["id"] for r in ds.take_all()) == list(range(30))
    assert (context.use_datasource_v2, context.shuffle_strategy) == before


def test_task_shuffle_groups_with_tasks_on_the_dataset_and_what_derives_from_it(local_ray, split_dir):
    context = ray.data.DataContext.get_current()
    before = context.shuffle_strategy
    ds = task_shuffle(read_parquet(split_dir))
    grouped = ds.groupby("key").count()
    assert grouped.context.shuffle_strategy == ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    assert {r["key"]: r["count()"] for r in grouped.take_all()} == {0: 9, 1: 9, 2: 6, 3: 6}
    assert context.shuffle_strategy == before


def test_small_splits_are_cached_and_large_ones_stream(local_ray, split_dir, monkeypatch):
    cached = stages.read_split(split_dir)
    assert isinstance(cached, MaterializedDataset) and cached.count() == 30
    monkeypatch.setattr(stages, "CACHE_SPLIT_BYTES", 0)
    streamed = stages.read_split(split_dir)
    assert not isinstance(streamed, MaterializedDataset) and streamed.count() == 30
