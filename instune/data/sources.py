"""The configured sources as Ray Data read tasks: every file planned before any work starts, each read by one
task into canonical records (RECORD_SCHEMA), its rejects quarantined as they come and the number of records it
held written for the accounting."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

if TYPE_CHECKING:
    from instune.config import SourceConfig


MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


# The canonical record (schema.py) as reading yields it: messages as structs, so no block's types depend on
# which rows it happens to hold.
RECORD_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("domain", pa.string()),
                           ("messages", MESSAGES_TYPE), ("metadata", pa.string())])


# Rows per Arrow table a read task yields: Ray Data cuts blocks from these as they come.
READ_TABLE_ROWS = 2048


@dataclass
class SourceFiles:
    name: str
    domain: str
    format: str
    field_map: dict | None
    files: list[str]


def plan_sources(sources: list[SourceConfig]) -> list[SourceFiles]:
    """Expand every source's paths before any work starts; a missing or empty path is a UserError."""
    from instune.data.read import expand_paths

    return [SourceFiles(s.name, s.domain, s.format, s.field_map, expand_paths(s.name, s.path)) for s in sources]


def read_file_tables(tasks: pa.Table, max_record_bytes: int, quarantine: str, counts_dir: str):
    """The kept records of each file in `tasks`, as RECORD_SCHEMA tables of READ_TABLE_ROWS; runs in a Ray task.

    A generator, so a worker never holds a whole file. Rejects go to `quarantine` as they gather
    (rejects.write_rejects); once a file is done, the number of records read from it goes to
    `counts_dir/<task index>.json`: the accounting's "read", counted by the reader itself.
    """
    from instune.data.formats import to_canonical
    from instune.data.read import iter_raw_records

    for task in tasks.to_pylist():
        field_map = json.loads(task["field_map"]) if task["field_map"] else None
        items = iter_raw_records(task["file"], max_record_bytes)
        results = to_canonical(items, task["source"], task["domain"], task["format"], field_map, task["file"])
        yield from kept_tables(results, RECORD_SCHEMA, READ_TABLE_ROWS, task, quarantine, counts_dir)


def kept_tables(results, schema: pa.Schema, table_rows: int, task: dict, quarantine: str, counts_dir: str):
    """The kept values of one file's ("kept" | "rejected", value) results as `schema` tables of `table_rows`.

    Rejects go to `quarantine` every `table_rows` and at the end, so neither list grows with the file; once the
    file is done, the number of records read goes to `counts_dir/<task index>.json`. Shared by the text and the
    image-text readers.
    """
    from instune.atomic import write_json
    from instune.data.rejects import write_rejects

    kept, rejected, read = [], [], 0
    for kind, value in results:
        read += 1
        if kind != "kept":
            rejected.append(value)
            if len(rejected) == table_rows:
                write_rejects(rejected, quarantine)
                rejected = []
            continue
        kept.append(value)
        if len(kept) == table_rows:
            yield pa.Table.from_pylist(kept, schema=schema)
            kept = []
    if kept:
        yield pa.Table.from_pylist(kept, schema=schema)
    write_rejects(rejected, quarantine)
    write_json(Path(counts_dir) / f"{task['index']:06d}.json",
               {"source": task["source"], "file": task["file"], "read": read})


def read_tasks(sources: list[SourceFiles]) -> list[dict]:
    """One task per file of every source, numbered."""
    tasks = [{"file": f, "source": s.name, "domain": s.domain, "format": s.format,
              "field_map": json.dumps(s.field_map) if s.field_map else ""} for s in sources for f in s.files]
    return [{**task, "index": i} for i, task in enumerate(tasks)]


def read_all(sources: list[SourceFiles], max_record_bytes: int, quarantine: str, counts_dir: str):
    """One Ray Dataset of the kept records of every file (RECORD_SCHEMA), one read task per file; rejects and
    per-file read counts are written by the read tasks (read_file_tables)."""
    import ray.data

    tasks = read_tasks(sources)
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    return ds.map_batches(read_file_tables, batch_size=1, batch_format="pyarrow",
                          fn_kwargs={"max_record_bytes": max_record_bytes, "quarantine": quarantine,
                                     "counts_dir": counts_dir})


def read_counts(counts_dir: Path, sources: list[SourceFiles]) -> dict[str, int]:
    """{source: records read} from the read tasks' count files; every file must have reported."""
    counts = {s.name: 0 for s in sources}
    reports = [json.loads(p.read_text()) for p in sorted(Path(counts_dir).glob("*.json"))]
    tasks = sum(len(s.files) for s in sources)
    assert len(reports) == tasks, f"{len(reports)} of {tasks} files reported how many records they hold"
    for report in reports:
        counts[report["source"]] += report["read"]
    return counts
