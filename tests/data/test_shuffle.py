"""The train mixture's shuffle: windowed (bounded memory) against global."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from instune.base_model import tokenizer_training_texts
from instune.data.schema import make_record
from instune.data.shuffle import shuffle_rows, windowed_shuffle
from instune.data.splits import mix_tokenize_pack
from instune.default.tokenizer import train_tokenizer


def ids_table(n: int) -> pa.Table:
    return pa.table({"id": [f"s:f:line {i}" for i in range(n)], "value": list(range(n))})


def test_shuffle_rows_is_a_seeded_permutation():
    batch = ids_table(50)
    once, again = shuffle_rows(batch, seed=1), shuffle_rows(batch, seed=1)
    assert once.equals(again) and sorted(once["value"].to_pylist()) == list(range(50))
    assert once["value"].to_pylist() != list(range(50))
    assert shuffle_rows(batch, seed=2)["value"].to_pylist() != once["value"].to_pylist()


def test_windowed_shuffle_permutes_within_windows_only(local_ray):
    ds = ray.data.from_arrow(ids_table(100))
    values = [r["value"] for r in windowed_shuffle(ds, seed=0, window_rows=25).take_all()]
    assert values == [r["value"] for r in windowed_shuffle(ray.data.from_arrow(ids_table(100)), 0, 25).take_all()]
    windows = [values[k:k + 25] for k in range(0, 100, 25)]
    assert [sorted(w) for w in windows] == [list(range(k, k + 25)) for k in range(0, 100, 25)]
    assert all(w != sorted(w) for w in windows)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(tokenizer_training_texts(per_domain=30), vocab_size=400).save_pretrained(str(directory))
    return str(directory)


def test_windowed_mixture_holds_the_same_examples_as_the_global_one(local_ray, tmp_path, tokenizer_dir):
    filtered = tmp_path / "filtered"
    filtered.mkdir()
    for source in ("a", "b"):  # one file per source, as phase 1 writes a source's records together
        records = [make_record(f"{source}:f.jsonl:line {i}", source, "d", [
            {"role": "user", "content": f"Question {i} from {source}?"},
            {"role": "assistant", "content": f"Answer {i}."}]) for i in range(60)]
        pq.write_table(pa.Table.from_pylist(records), filtered / f"{source}.parquet")
    common = dict(weights={"a": 1.0, "b": 1.0}, size=None, seed=0, tokenizer_path=tokenizer_dir, seq_len=64,
                  truncation="drop", pack=False)
    runs = {}
    for shuffle in ("global", "windowed", "windowed"):
        train, _, _ = mix_tokenize_pack(filtered, {"a": 60, "b": 60}, shuffle=shuffle, shuffle_window=40, **common)
        runs.setdefault(shuffle, []).append([tuple(r["input_ids"]) for r in train.take_all()])
    windowed, repeat = runs["windowed"]
    assert windowed == repeat  # reproducible
    assert sorted(windowed) == sorted(runs["global"][0]) and len(windowed) == 120
    assert windowed != sorted(windowed)
