"""sources.kept_tables: the loop both the text and the image-text readers run over one file's results."""

import json

import pyarrow as pa
import pyarrow.parquet as pq

from instune.data.schema import make_reject
from instune.data.sources import kept_tables

SCHEMA = pa.schema([("id", pa.string())])


def test_kept_tables_chunks_kept_rows_and_writes_rejects_and_the_read_count(tmp_path):
    quarantine, counts = tmp_path / "quarantine", tmp_path / "counts"
    results = []
    for i in range(7):
        results.append(("kept", {"id": f"k{i}"}))
        if i % 2 == 0:  # 4 rejects: one full batch of 3 written mid-file, 1 at the end
            results.append(("rejected", make_reject("s", "f.jsonl", str(i), "read", "bad")))
    task = {"index": 5, "source": "s", "file": "f.jsonl"}

    tables = list(kept_tables(iter(results), SCHEMA, 3, task, str(quarantine), str(counts)))

    assert [t.num_rows for t in tables] == [3, 3, 1]
    assert [row["id"] for t in tables for row in t.to_pylist()] == [f"k{i}" for i in range(7)]
    reject_files = sorted(quarantine.glob("*.parquet"))
    assert len(reject_files) == 2
    assert sorted(r for f in reject_files for r in pq.read_table(f).column("record").to_pylist()) == \
        ["0", "2", "4", "6"]
    assert json.loads((counts / "000005.json").read_text()) == {"source": "s", "file": "f.jsonl", "read": 11}
