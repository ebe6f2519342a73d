"""Prepare image-text corpora on Ray Data: read -> images -> exact dedup -> tokenize with the processor.

The text pipeline's accounting holds here too: every record read is kept or rejected with a stage and a reason,
read == kept + rejected per source (accounting.phase1_counts over MULTIMODAL_STAGES), and every kept record is
tokenized or dropped with its reason. Each file is read by one Ray task (multimodal_formats.to_pending); the
images of its records are fetched, decoded, checked and resized in tasks of IMAGE_BLOCK_ROWS records
(with_images), so image work spreads over the cluster's cores whatever the number of files; rejects go to the
quarantine from the task that finds them (rejects.py). The records exact dedup keeps are written to filtered/
and tokenized by the same tasks, which compute a block's pixel values at once (multimodal_tokenize.ImagePixels).

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
# A record read, its images named but not yet read (multimodal_formats.to_pending).
PENDING_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("domain", pa.string()),
                            ("messages", MESSAGES_TYPE), ("metadata", pa.string()),
                            ("image_refs", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
                            ("base_dir", pa.string()), ("file", pa.string()), ("position", pa.string()),
                            ("example", pa.string())])
TOKENIZED_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("domain", pa.string()),
                              ("metadata", pa.string()), ("input_ids", pa.list_(pa.int64())),
                              ("labels", pa.list_(pa.int64())), ("pixel_values", pa.list_(pa.float32())),
                              ("image_shape", pa.list_(pa.int64()))])
READ_TABLE_ROWS = 256  # pending records hold text and image references (from Parquet, the image bytes)
# Records per image task, and so per block after it (dedup, filtered/, tokenize): enough images that a task's
# fixed cost is small against decoding them, few enough that a file's images spread over every core.
IMAGE_BLOCK_ROWS = 128


@dataclass
class MultimodalSource:
    name: str
    domain: str
    format: str  # multimodal_formats.MULTIMODAL_FORMATS
    files: list[str]


def read_pending_tables(tasks: pa.Table, max_record_bytes: int, quarantine: str, counts_dir: str):
    """The records of each file in `tasks`, images named but not read; runs in a Ray task (sources.kept_tables)."""
    from instune.data.multimodal_formats import to_pending
    from instune.data.read import iter_raw_records
    from instune.data.sources import kept_tables

    for task in tasks.to_pylist():
        items = iter_raw_records(task["file"], max_record_bytes)
        results = to_pending(items, task["source"], task["domain"], task["format"], task["file"])
        yield from kept_tables(results, PENDING_SCHEMA, READ_TABLE_ROWS, task, quarantine, counts_dir)


def image_table(batch: pa.Table, limits: ImageLimits, quarantine: str) -> pa.Table:
    """The records of a batch of pending ones whose images are all usable, with their resized PNGs; the others
    go to the quarantine with their reason (stage "image")."""
    from instune.data.images import ImageError
    from instune.data.multimodal_formats import image_reject, with_images
    from instune.data.rejects import write_rejects

    kept, rejected = [], []
    for pending in batch.to_pylist():
        try:
            kept.append(with_images(pending, limits))
        except ImageError as e:
            rejected.append(image_reject(pending, str(e)))
    write_rejects(rejected, quarantine)
    return pa.Table.from_pylist(kept, schema=MULTIMODAL_RECORD_SCHEMA)


def read_multimodal(sources: list[MultimodalSource], max_record_bytes: int, limits: ImageLimits, quarantine: str,
                    counts_dir: str):
    """One Ray Dataset of the kept records of every file, with their images.

    One read task per file parses its records; their images are read, decoded and resized in tasks of
    IMAGE_BLOCK_ROWS records each, so a corpus in one file still decodes on every core (fused with the read,
    one file's images would be decoded in its one read task).
    """
    import ray.data

    tasks = [{"file": f, "source": s.name, "domain": s.domain, "format": s.format} for s in sources for f in s.files]
    tasks = [{**task, "index": i} for i, task in enumerate(tasks)]
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    pending = ds.map_batches(read_pending_tables, batch_size=1, batch_format="pyarrow",
                             fn_kwargs={"max_record_bytes": max_record_bytes, "quarantine": quarantine,
                                        "counts_dir": counts_dir})
    # Naming the scheduling strategy (Ray Data's default, so nothing changes where tasks run) keeps the image
    # tasks apart from the read: Ray Data fuses map operators only when their remote arguments are equal. The
    # maps after them (exact dedup's keys and its write; without dedup, tokenizing and its write) name none,
    # inherit it, and run in the same tasks. A separate operator for those would get its own share of the CPUs
    # (Ray Data reserves resources per operator): on 2 CPUs the image tasks ran one at a time, the other CPU
    # kept for computing the keys, and prepare decoded at about half the speed of decoding alone.
    return pending.repartition(target_num_rows_per_block=IMAGE_BLOCK_ROWS).map_batches(
        image_table, batch_format="pyarrow", batch_size=None, scheduling_strategy="SPREAD",
        fn_kwargs={"limits": limits, "quarantine": quarantine})


_PROCESSORS: dict = {}  # per worker process: the processor, its image tokens and pixel map, loaded once


def _processor(model_path: str):
    if model_path not in _PROCESSORS:
        from transformers import AutoProcessor

        from instune.data.multimodal_tokenize import ImagePixels, image_tokens

        processor = AutoProcessor.from_pretrained(model_path)
        _PROCESSORS[model_path] = (processor, image_tokens(processor), ImagePixels(processor.image_processor))
    return _PROCESSORS[model_path]


def filter_and_tokenize(batch: pa.Table, model_path: str, max_length: int, filtered_dir: str,
                        dropped_dir: str) -> pa.Table:
    """The tokenized rows of a batch of kept records (tokenize_table), the records themselves written to
    `filtered_dir` by this task (a file named by their ids, rejects.write_once): one pass writes both, where
    writing filtered/ and reading it back to tokenize cost a second Ray Data job and a second read of every
    image."""
    from instune.data.rejects import write_once

    if batch.num_rows:
        write_once(batch, filtered_dir, "\n".join(batch["id"].to_pylist()))
    return tokenize_table(batch, model_path, max_length, dropped_dir)


def tokenize_table(batch: pa.Table, model_path: str, max_length: int, dropped_dir: str) -> pa.Table:
    """The tokenized rows of a batch of filtered records; the ones that cannot be trained on go to `dropped_dir`."""
    import numpy as np

    from instune.data.filters import reject_for_record
    from instune.data.multimodal_tokenize import tokenize_multimodal
    from instune.data.rejects import write_rejects
    from instune.data.tokenize import TokenizeError

    processor, image, pixels = _processor(model_path)
    records = batch.to_pylist()
    rows, dropped = [], []
    for record, result in zip(records, tokenize_multimodal(records, processor, image, max_length, pixels)):
        if isinstance(result, TokenizeError):
            dropped.append(reject_for_record(record, "tokenize", str(result)))
            continue
        rows.append((record, result))
    write_rejects(dropped, dropped_dir)
    columns = {name: [record[name] for record, _ in rows] for name in ("id", "source", "domain", "metadata")}
    # The list columns are built from whole numpy arrays: from_pylist would convert thousands of pixel values
    # per row one Python float at a time.
    for name in ("input_ids", "labels", "pixel_values"):
        arrays = [np.asarray(result[name]) for _, result in rows]
        offsets = np.cumsum([0] + [len(a) for a in arrays], dtype=np.int32)
        values = np.concatenate(arrays) if arrays else np.zeros(0)
        value_type = TOKENIZED_SCHEMA.field(name).type.value_type
        columns[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))
    columns["image_shape"] = [result["image_shape"] for _, result in rows]
    return pa.table(columns, schema=TOKENIZED_SCHEMA)


def prepare_multimodal(sources: list[MultimodalSource], model_path: str, out_dir: str | Path, *,
                       limits: ImageLimits, max_length: int, max_record_bytes: int = 64 << 20,
                       dedup: bool = True) -> dict:
    """Read, check, deduplicate and tokenize `sources` into `out_dir` (whole or not at all); return the manifest."""
    from instune.atomic import atomic_dir, write_json
    from instune.data.accounting import MULTIMODAL_STAGES, count_rows, phase1_counts, reject_kinds
    from instune.data.dedup.exact import exact_dedup
    from instune.data.sources import read_counts

    out_dir, started = Path(out_dir), time.time()
    with atomic_dir(out_dir) as tmp:
        quarantine, work = str(tmp / "quarantine"), tmp / ".work"
        kept = read_multimodal(sources, max_record_bytes, limits, quarantine, str(work / "read"))
        if dedup:
            kept, _ = exact_dedup(kept, str(work / "exact"), quarantine)
        (tmp / "filtered").mkdir()
        kept.map_batches(filter_and_tokenize, batch_format="pyarrow", batch_size=None,
                         fn_kwargs={"model_path": model_path, "max_length": max_length,
                                    "filtered_dir": str(tmp / "filtered"), "dropped_dir": str(tmp / "dropped")}
                         ).write_parquet(str(tmp / "tokenized"))
        counts = phase1_counts(read_counts(work / "read", sources), tmp / "filtered", tmp / "quarantine",
                               MULTIMODAL_STAGES)
        shutil.rmtree(work, ignore_errors=True)
        rows = {s: n for (s,), n in count_rows(tmp / "tokenized", ["source"]).items()}
        drop_kinds = reject_kinds(tmp / "dropped")
        for name, c in counts.items():
            # The reasons a kept record was not trained on, beside phase 1's rejects (stage "tokenize"); their
            # counts are the records dropped (dropped/ is read once).
            drops = [{k: v for k, v in kind.items() if k != "source"} for kind in drop_kinds if kind["source"] == name]
            c["tokenized"], c["dropped"] = rows.get(name, 0), sum(kind["count"] for kind in drops)
            c["rejects"] += drops
            assert c["kept"] == c["tokenized"] + c["dropped"], f"source {name}: kept {c['kept']} != tokenized " \
                                                               f"{c['tokenized']} + dropped {c['dropped']}"
        manifest = {"sources": counts, "max_length": max_length, "image_size": limits.size,
                    "seconds": round(time.time() - started, 1)}
        write_json(tmp / "manifest.json", manifest)
    read = sum(c["read"] for c in counts.values())
    print(f"[prepare] multimodal: {read} records -> kept {sum(c['kept'] for c in counts.values())}, tokenized "
          f"{sum(rows.values())} in {manifest['seconds']:.1f} s", flush=True)
    return json.loads((out_dir / "manifest.json").read_text())
