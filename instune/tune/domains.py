"""Mixing by domain: the prepared records keyed by domain instead of source, and written out per domain.

`mix_tokenize_pack` weights records by their `source` column. The embedded corpus (like many real ones)
puts every domain into each of its files, so weighting sources cannot leave a domain out. A copy of
`filtered/` whose `source` is the record's domain lets a sweep weight domains without reading or filtering
the inputs again; the per-domain export turns the best domain mix into sources a runnable config can name.
Both stream the Parquet files batch by batch, so memory holds one batch, not the data.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from instune.atomic import atomic_dir

BATCH_ROWS = 4096


def parquet_files(directory: Path) -> list[Path]:
    files = sorted(Path(directory).rglob("*.parquet"))
    assert files, f"{directory} holds no Parquet files"
    return files


def rekey_by_domain(filtered_dir: Path, out_dir: Path) -> dict[str, int]:
    """Write the records of `filtered_dir` with `source` set to their domain (once); return records per domain."""
    if not out_dir.is_dir():
        with atomic_dir(out_dir) as tmp:
            for i, path in enumerate(parquet_files(filtered_dir)):
                source = pq.ParquetFile(path)
                with pq.ParquetWriter(tmp / f"part-{i:05d}.parquet", source.schema_arrow) as writer:
                    for batch in source.iter_batches(batch_size=BATCH_ROWS):
                        table = pa.Table.from_batches([batch])
                        table = table.set_column(table.schema.get_field_index("source"), "source",
                                                 table.column("domain"))
                        writer.write_table(table)
    counts: dict[str, int] = {}
    for path in parquet_files(out_dir):
        for entry in pq.read_table(path, columns=["domain"]).column("domain").value_counts().to_pylist():
            counts[entry["values"]] = counts.get(entry["values"], 0) + entry["counts"]
    return counts


def write_domain_sources(filtered_dir: Path, out_dir: Path, domains: list[str]) -> dict[str, Path]:
    """One OpenAI-format JSONL file of the prepared records per domain; returns domain -> file."""
    with atomic_dir(out_dir) as tmp:
        files = {domain: open(tmp / f"{domain}.jsonl", "w", encoding="utf-8") for domain in domains}
        try:
            for path in parquet_files(filtered_dir):
                for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=["domain", "messages"]):
                    for domain, messages in zip(batch.column("domain").to_pylist(),
                                                batch.column("messages").to_pylist()):
                        if domain in files:
                            record = {"messages": messages, "domain": domain}
                            files[domain].write(json.dumps(record, ensure_ascii=False) + "\n")
        finally:
            for f in files.values():
                f.close()
    return {domain: out_dir / f"{domain}.jsonl" for domain in domains}
