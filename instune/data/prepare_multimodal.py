"""Prepare image-text corpora on Ray Data: read -> images -> exact dedup -> tokenize with the processor.

The text pipeline's accounting holds here too: every record read is kept or rejected with a stage and a reason,
read == kept + rejected per source (accounting.phase1_counts over MULTIMODAL_STAGES), and every kept record is
tokenized or dropped with its reason. Each file is read by one Ray task, which also fetches, decodes, checks
and resizes the images of its records (multimodal_formats.to_multimodal), so image work spreads over the
cluster's cores with the files; rejects go to the quarantine from the task that finds them (rejects.py).

Layout under `out_dir` (written whole, then renamed): filtered/ (records with resized PNG images),
quarantine/, tokenized/ (input_ids, labels, pixel_values, image_shape), dropped/, manifest.json.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from instune.data.images import ImageLimits
from instune.data.sources import MESSAGES_TYPE

MULTIMODAL_RECORD_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("domain", pa.string()),
                                      ("messages", MESSAGES_TYPE), ("metadata", pa.string()),
                                      ("images", pa.list_(pa.binary())), ("images_digest", pa.string())])
TOKENIZED_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("domain", pa.string()),
                              ("metadata", pa.string()), ("input_ids", pa.list_(pa.int64())),
                              ("labels", pa.list_(pa.int64())), ("pixel_values", pa.list_(pa.float32())),
                              ("image_shape", pa.list_(pa.int64()))])
READ_TABLE_ROWS = 256  # records with images are larger than text records: smaller tables


@dataclass
class MultimodalSource:
    name: str
    domain: str
    format: str  # multimodal_formats.MULTIMODAL_FORMATS
    files: list[str]


def read_multimodal_tables(tasks: pa.Table, max_record_bytes: int, limits: ImageLimits, quarantine: str,
                           counts_dir: str):
    """The kept records (with images) of each file in `tasks`; runs in a Ray task (sources.read_file_tables)."""
    from instune.data.multimodal_formats import to_multimodal
    from instune.data.read import iter_raw_records
    from instune.data.sources import kept_tables

    for task in tasks.to_pylist():
        items = iter_raw_records(task["file"], max_record_bytes)
        results = to_multimodal(items, task["source"], task["domain"], task["format"], task["file"], limits)
        yield from kept_tables(results, MULTIMODAL_RECORD_SCHEMA, READ_TABLE_ROWS, task, quarantine, counts_dir)


def read_multimodal(sources: list[MultimodalSource], max_record_bytes: int, limits: ImageLimits, quarantine: str,
                    counts_dir: str):
    """One Ray Dataset of the kept records of every file, one read task per file."""
    import ray.data

    tasks = [{"file": f, "source": s.name, "domain": s.domain, "format": s.format} for s in sources for f in s.files]
    tasks = [{**task, "index": i} for i, task in enumerate(tasks)]
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    return ds.map_batches(read_multimodal_tables, batch_size=1, batch_format="pyarrow",
                          fn_kwargs={"max_record_bytes": max_record_bytes, "limits": limits,
                                     "quarantine": quarantine, "counts_dir": counts_dir})


_PROCESSORS: dict = {}  # per worker process: the processor and its image tokens, loaded once


def _processor(model_path: str):
    if model_path not in _PROCESSORS:
        from transformers import AutoProcessor

        from instune.data.multimodal_tokenize import image_tokens

        processor = AutoProcessor.from_pretrained(model_path)
        _PROCESSORS[model_path] = (processor, image_tokens(processor))
    return _PROCESSORS[model_path]


def tokenize_table(batch: pa.Table, model_path: str, max_length: int, dropped_dir: str) -> pa.Table:
    """The tokenized rows of a batch of filtered records; the ones that cannot be trained on go to `dropped_dir`."""
    from instune.data.filters import reject_for_record
    from instune.data.multimodal_tokenize import tokenize_multimodal
    from instune.data.rejects import write_rejects
    from instune.data.tokenize import TokenizeError

    processor, image = _processor(model_path)
    records = batch.to_pylist()
    rows, dropped = [], []
    for record, result in zip(records, tokenize_multimodal(records, processor, image, max_length)):
        if isinstance(result, TokenizeError):
            dropped.append(reject_for_record(record, "tokenize", str(result)))
            continue
        rows.append({"id": record["id"], "source": record["source"], "domain": record["domain"],
                     "metadata": record["metadata"], **result})
    write_rejects(dropped, dropped_dir)
    return pa.Table.from_pylist(rows, schema=TOKENIZED_SCHEMA)


def prepare_multimodal(sources: list[MultimodalSource], model_path: str, out_dir: str | Path, *,
                       limits: ImageLimits, max_length: int, max_record_bytes: int = 64 << 20,
                       dedup: bool = True) -> dict:
    """Read, check, deduplicate and tokenize `sources` into `out_dir` (whole or not at all); return the manifest."""
    from instune.atomic import atomic_dir, write_json
    from instune.data.accounting import MULTIMODAL_STAGES, count_rows, phase1_counts
    from instune.data.dedup.exact import exact_dedup
    from instune.data.raydata import read_parquet
    from instune.data.sources import read_counts

    out_dir, started = Path(out_dir), time.time()
    with atomic_dir(out_dir) as tmp:
        quarantine, work = str(tmp / "quarantine"), tmp / ".work"
        kept = read_multimodal(sources, max_record_bytes, limits, quarantine, str(work / "read"))
        if dedup:
            kept, _ = exact_dedup(kept, str(work / "exact"), quarantine)
        kept.write_parquet(str(tmp / "filtered"))
        counts = phase1_counts(read_counts(work / "read", sources), tmp / "filtered", tmp / "quarantine",
                               MULTIMODAL_STAGES)
        shutil.rmtree(work, ignore_errors=True)
        records = sum(c["kept"] for c in counts.values())
        if records:
            tokenized = read_parquet(tmp / "filtered").map_batches(
                tokenize_table, batch_format="pyarrow", batch_size=64,
                fn_kwargs={"model_path": model_path, "max_length": max_length, "dropped_dir": str(tmp / "dropped")})
            tokenized.write_parquet(str(tmp / "tokenized"))
        rows = {s: n for (s,), n in count_rows(tmp / "tokenized", ["source"]).items()}
        dropped = {s: n for (s,), n in count_rows(tmp / "dropped", ["source"]).items()}
        for name, c in counts.items():
            c["tokenized"], c["dropped"] = rows.get(name, 0), dropped.get(name, 0)
            assert c["kept"] == c["tokenized"] + c["dropped"], f"source {name}: kept {c['kept']} != tokenized " \
                                                               f"{c['tokenized']} + dropped {c['dropped']}"
        manifest = {"sources": counts, "max_length": max_length, "image_size": limits.size,
                    "seconds": round(time.time() - started, 1)}
        write_json(tmp / "manifest.json", manifest)
    read = sum(c["read"] for c in counts.values())
    print(f"[prepare] multimodal: {read} records -> kept {sum(c['kept'] for c in counts.values())}, tokenized "
          f"{sum(rows.values())} in {manifest['seconds']:.1f} s", flush=True)
    return json.loads((out_dir / "manifest.json").read_text())
