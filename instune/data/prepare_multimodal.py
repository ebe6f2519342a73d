"""Prepare image-text corpora on Ray Data: read -> images -> tokenize -> write, then exact dedup on the written parts.

The text pipeline's accounting holds here too: every record read is kept or rejected with a stage and a reason,
read == kept + rejected per source (accounting.phase1_counts over MULTIMODAL_STAGES), and every kept record is
tokenized or dropped with its reason. Each file is read by one Ray task (multimodal_formats.to_pending); the
images of its records are fetched, decoded, checked, resized and tokenized, and the block written, in tasks of
IMAGE_BLOCK_ROWS records (write_block), so image work spreads over the cluster's cores whatever the number of
files; rejects go to the quarantine from the task that finds them (rejects.py). The one pass over the images
returns each record's exact-dedup key, and the duplicates are then taken out of the parts that hold them
(multimodal_parts.py): one pass over the images instead of writing them to a work directory and reading them
back.

Layout under `out_dir` (written whole, then renamed): filtered/ (records with resized PNG images),
quarantine/, tokenized/ (input_ids, labels, the images: TOKENIZED_SCHEMA), dropped/, manifest.json.
"""

from __future__ import annotations

import json
import os
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
# A row's images (multimodal_tokenize.ImagePixels): their RGB bytes and the per-channel map to the processor's
# pixel values, or those pixel values themselves; image_shape is (images, channels, height, width) of either.
TOKENIZED_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("domain", pa.string()),
                              ("metadata", pa.string()), ("input_ids", pa.list_(pa.int64())),
                              ("labels", pa.list_(pa.int64())), ("pixels", pa.list_(pa.uint8())),
                              ("pixel_map", pa.list_(pa.float32())), ("pixel_values", pa.list_(pa.float32())),
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


def checked_images(batch: pa.Table, limits: ImageLimits, quarantine: str) -> tuple[list[dict], list[list]]:
    """The records of a batch of pending ones whose images are all usable, with their resized PNGs, and those
    images' RGB arrays (multimodal_formats.with_resized_images); the others go to the quarantine with their
    reason (stage "image")."""
    from instune.data.images import ImageError
    from instune.data.multimodal_formats import image_reject, with_resized_images
    from instune.data.rejects import write_rejects

    kept, arrays, rejected = [], [], []
    for pending in batch.to_pylist():
        try:
            record, pixels = with_resized_images(pending, limits)
        except ImageError as e:
            rejected.append(image_reject(pending, str(e)))
            continue
        kept.append(record)
        arrays.append(pixels)
    write_rejects(rejected, quarantine)
    return kept, arrays


def write_parts(sources: list[MultimodalSource], model_path: str, out_dir: str, *, limits: ImageLimits,
                max_length: int, max_record_bytes: int, counts_dir: str, keys_dir: str | None) -> int:
    """Write every record with usable images as parts under `out_dir` (write_block), each part's exact-dedup keys
    to `keys_dir` (None: no dedup); the number of records written.

    One read task per file parses its records; their images are read, decoded, resized, tokenized and written
    in tasks of IMAGE_BLOCK_ROWS records each (write_block), so a corpus in one file still decodes on every core
    (fused with the read, one file's images would be decoded in its one read task).
    """
    import ray.data

    quarantine = os.path.join(out_dir, "quarantine")
    tasks = [{"file": f, "source": s.name, "domain": s.domain, "format": s.format} for s in sources for f in s.files]
    tasks = [{**task, "index": i} for i, task in enumerate(tasks)]
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    pending = ds.map_batches(read_pending_tables, batch_size=1, batch_format="pyarrow",
                             fn_kwargs={"max_record_bytes": max_record_bytes, "quarantine": quarantine,
                                        "counts_dir": counts_dir})
    # The pending records (image references; a Parquet source's image bytes) are read to the object store first,
    # and the image tasks then start from those blocks. Streamed from the running read tasks, the blocks came out
    # of them a few at a time, the image tasks ran one after another (measured: 32 tasks of 0.1 s on 2 CPUs, one
    # at a time), and prepare took 3.6 s for 4,000 small images against 2.2 s this way. A corpus larger than the
    # object store spills to disk for the length of this pass, as Ray Data's materialize does.
    pending = pending.repartition(target_num_rows_per_block=IMAGE_BLOCK_ROWS).materialize()
    written = pending.map_batches(
        write_block, batch_format="pyarrow", batch_size=None,
        fn_kwargs={"limits": limits, "model_path": model_path, "max_length": max_length, "out_dir": out_dir,
                   "quarantine": quarantine, "keys_dir": keys_dir})
    # Ray Data 2.60 reserves part of the CPUs for each operator's own use; with this one operator on 2 CPUs that
    # left it one task at a time (measured: 3.7 s against 2.2 s for the pass above). The dataset's own context,
    # so nothing else the caller runs changes.
    written.context.op_resource_reservation_enabled = False
    return sum(int(t["written"].to_numpy().sum())
               for t in written.iter_batches(batch_size=None, batch_format="pyarrow") if t.num_rows)


def remove_exact_duplicates(keys_dir: str, out_dir: str) -> int:
    """Take every exact duplicate (dedup/exact.py's rule: one record per normalised text and image bytes, the
    first in id order kept) out of the parts written under `out_dir`, from the keys in `keys_dir`; the number
    removed. Nothing but the keys is read when no key repeats."""
    import pyarrow.compute as pc
    import ray.data

    from instune.data.dedup.exact import HASH_COLUMN, ORDER_COLUMN, sorted_repeats
    from instune.data.multimodal_parts import PART_COLUMN, duplicate_rows, remove_duplicates
    from instune.data.raydata import cluster_cpus, collect, read_parquet, repeated_keys

    repeated = repeated_keys(None, keys_dir, HASH_COLUMN, ORDER_COLUMN)
    if repeated is None:
        return 0
    hashes, firsts = sorted_repeats(repeated)
    duplicates = collect(read_parquet(keys_dir).map_batches(duplicate_rows, batch_format="pyarrow",
                                                            fn_kwargs={"hashes": hashes, "firsts": firsts}))
    if duplicates is None:
        return 0
    # One block per task, each holding whole parts, so no part is rewritten by two tasks.
    parts, tasks = pc.unique(duplicates[PART_COLUMN]).to_pylist(), cluster_cpus()
    blocks = [duplicates.filter(pc.is_in(duplicates[PART_COLUMN], value_set=pa.array(parts[i::tasks])))
              for i in range(min(tasks, len(parts)))]
    removed = ray.data.from_arrow(blocks).map_batches(
        remove_duplicates, batch_format="pyarrow", batch_size=None,
        fn_kwargs={"out_dir": out_dir, "quarantine": os.path.join(out_dir, "quarantine")})
    return int(sum(t["removed"].to_numpy().sum() for t in removed.iter_batches(batch_size=None,
                                                                              batch_format="pyarrow")))


# Per worker process: the processor, its image tokens, pixel map, chat renderer and Rust tokenizer, built once
# (the renderer took 2.8 ms a block when encode_conversations built it per call).
_PROCESSORS: dict = {}


def _processor(model_path: str) -> tuple:
    if model_path not in _PROCESSORS:
        from transformers import AutoProcessor

        from instune.data.chat_template import ChatRenderer
        from instune.data.multimodal_tokenize import ImagePixels, image_tokens
        from instune.data.tokenize import rust_tokenizer

        processor = AutoProcessor.from_pretrained(model_path)
        _PROCESSORS[model_path] = (processor, image_tokens(processor), ImagePixels(processor.image_processor),
                                   ChatRenderer(processor.tokenizer), rust_tokenizer(processor.tokenizer))
    return _PROCESSORS[model_path]


def write_block(batch: pa.Table, limits: ImageLimits, model_path: str, max_length: int, out_dir: str,
                quarantine: str, keys_dir: str | None) -> pa.Table:
    """One block of pending records through the image checks and the tokenizer, written as a part
    (multimodal_parts.py): the records with usable images to filtered/, their tokenized rows to tokenized/, the
    ones that cannot be trained on to dropped/; their dedup keys to `keys_dir` (written here: Ray Data's
    Parquet sink cost more per block than the keys themselves). Returns the number of records written."""
    from instune.data.multimodal_parts import part_keys, part_name, write_part

    records, arrays = checked_images(batch, limits, quarantine)
    name = part_name([r["id"] for r in records])
    if records:
        write_part(pa.Table.from_pylist(records, schema=MULTIMODAL_RECORD_SCHEMA), os.path.join(out_dir, "filtered"),
                   name)
        # Tokenized from the arrays the PNGs were made from: decoding the PNGs again cost about a tenth of a
        # millisecond an image, a fifth of decoding the original.
        decoded = [{**record, "images": images} for record, images in zip(records, arrays)]
        tokenized, dropped, trained = tokenize_table(decoded, model_path, max_length)
        write_part(tokenized, os.path.join(out_dir, "tokenized"), name)
        write_part(dropped, os.path.join(out_dir, "dropped"), name)
        if keys_dir is not None:
            write_part(part_keys(records, name, trained), keys_dir, name)
    return pa.table({"written": [len(records)]})


def tokenize_table(records: list[dict], model_path: str, max_length: int
                   ) -> tuple[pa.Table, pa.Table, list[bool]]:
    """(tokenized rows, reject rows of the records that cannot be trained on, which records were tokenized) of
    filtered records; both tables in the records' order."""
    import numpy as np

    from instune.data.filters import reject_for_record
    from instune.data.multimodal_tokenize import tokenize_multimodal
    from instune.data.rejects import REJECT_SCHEMA
    from instune.data.tokenize import TokenizeError

    processor, image, pixels, render, backend = _processor(model_path)
    rows, dropped = [], []
    results = tokenize_multimodal(records, processor, image, max_length, pixels, render=render, backend=backend)
    for record, result in zip(records, results):
        if isinstance(result, TokenizeError):
            dropped.append(reject_for_record(record, "tokenize", str(result)))
            continue
        rows.append((record, result))
    columns = {name: [record[name] for record, _ in rows] for name in ("id", "source", "domain", "metadata")}
    # The list columns are built from whole numpy arrays: from_pylist would convert thousands of pixel values
    # per row one Python number at a time.
    for name in ("input_ids", "labels", "pixels", "pixel_map", "pixel_values"):
        arrays = [np.asarray(result[name]) for _, result in rows]
        offsets = np.cumsum([0] + [len(a) for a in arrays], dtype=np.int32)
        values = np.concatenate(arrays) if arrays else np.zeros(0)
        value_type = TOKENIZED_SCHEMA.field(name).type.value_type
        columns[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))
    columns["image_shape"] = [result["image_shape"] for _, result in rows]
    trained = [not isinstance(result, TokenizeError) for result in results]
    return (pa.table(columns, schema=TOKENIZED_SCHEMA), pa.Table.from_pylist(dropped, schema=REJECT_SCHEMA),
            trained)


def prepare_multimodal(sources: list[MultimodalSource], model_path: str, out_dir: str | Path, *,
                       limits: ImageLimits, max_length: int, max_record_bytes: int = 64 << 20,
                       dedup: bool = True) -> dict:
    """Read, check, deduplicate and tokenize `sources` into `out_dir` (whole or not at all); return the manifest."""
    from instune.atomic import atomic_dir, write_json
    from instune.data.accounting import MULTIMODAL_STAGES, count_rows, phase1_counts, reject_kinds
    from instune.data.sources import read_counts

    out_dir, started = Path(out_dir), time.time()
    with atomic_dir(out_dir) as tmp:
        work = tmp / ".work"
        keys_dir = str(work / "keys") if dedup else None
        write_parts(sources, model_path, str(tmp), limits=limits, max_length=max_length,
                    max_record_bytes=max_record_bytes, counts_dir=str(work / "read"), keys_dir=keys_dir)
        if keys_dir is not None:
            remove_exact_duplicates(keys_dir, str(tmp))
        (tmp / "filtered").mkdir(exist_ok=True)
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
