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


def test_repeated_keys_is_the_same_grouped_here_or_by_ray_over_files_or_materialized(local_ray, tmp_path):
    import random

    from instune.data.raydata import persist, repeated_keys

    rng = random.Random(3)
    rows = [{"key": rng.randrange(400), "order": f"r{rng.randrange(10_000):05d}", "text": "x" * rng.randrange(9)}
            for _ in range(500)]
    expected = {}
    for row in rows:
        count, first = expected.get(row["key"], (0, None))
        expected[row["key"]] = (count + 1, row["order"] if first is None else min(first, row["order"]))
    expected = {k: v for k, v in expected.items() if v[0] > 1}
    assert 0 < len(expected) < len({r["key"] for r in rows})  # some keys repeat, some do not
    source = ray.data.from_items(rows, override_num_blocks=7)
    on_disk = persist(source, tmp_path / "keys")
    assert len(list((tmp_path / "keys").glob("*.parquet"))) > 1
    results = [repeated_keys(on_disk, tmp_path / "keys", "key", "order"),  # grouped in the driver
               repeated_keys(on_disk, tmp_path / "keys", "key", "order", max_driver_rows=10),  # by Ray, from files
               repeated_keys(persist(source, None), None, "key", "order")]  # by Ray, materialized
    for table in results:
        assert {k: (c, f) for k, c, f in zip(*(table[n].to_pylist() for n in ("key", "count", "first")))} == expected
    empty = persist(ray.data.from_items(rows[:0] or [{"key": 1, "order": "a"}]).filter(lambda r: False),
                    tmp_path / "none")
    assert repeated_keys(empty, tmp_path / "none", "key", "order") is None
