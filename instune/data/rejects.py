"""Rejects written to the quarantine by the task that finds them, while it passes the kept records on.

A stage that splits its input into kept records and rejects would otherwise need its output twice, once for
each view, so the whole corpus had to be stored (raydata.persist) and read back twice. With a quarantine
directory, a stage's task writes its batch's rejects there itself and yields only the kept records: one pass,
and the rejects are on disk once the kept records have been consumed downstream (prepare writes them all).

A file is named by what it holds (every reject's source, file, record and stage), written under a hidden name
and renamed: a retried task rewrites its own file instead of adding a copy, and no reader takes a partial
file. The accounting (read == kept + rejected, per source) checks that nothing was lost or counted twice.
Phase 2 writes the records it drops at tokenization the same way (`write_once`).
"""

from __future__ import annotations

import hashlib
import os

import pyarrow as pa

from instune.data.schema import REJECT_COLUMNS

REJECT_SCHEMA = pa.schema([(name, pa.string()) for name in REJECT_COLUMNS])


def once_name(key: str) -> str:
    """The file name `write_once` gives a table that `key` names."""
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest() + ".parquet"


def write_named(table: pa.Table, directory: str, name: str) -> None:
    """`table` as `directory/name`, written under a hidden name and renamed, so no reader takes a partial file."""
    import pyarrow.parquet as pq

    os.makedirs(directory, exist_ok=True)
    partial = os.path.join(directory, f".{name}.{os.getpid()}.partial")
    pq.write_table(table, partial)
    os.replace(partial, os.path.join(directory, name))


def write_once(table: pa.Table, directory: str, key: str) -> None:
    """`table` as `directory/<digest of key>.parquet` (write_named): `key` names what the table holds, so a task
    that runs again rewrites the same file."""
    write_named(table, directory, once_name(key))


def write_rejects(rows: list[dict], directory: str) -> None:
    """Reject rows (schema.make_reject) as one Parquet file in `directory`; nothing for no rows."""
    if not rows:
        return
    key = "\n".join(f"{r['source']}\0{r['file']}\0{r['record']}\0{r['stage']}" for r in rows)
    write_once(pa.Table.from_pylist(rows, schema=REJECT_SCHEMA), directory, key)
