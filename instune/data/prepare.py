"""`instune prepare`: raw corpora -> filtered per-source records -> mixed, tokenized, packed shards.

Two phases, both streaming Ray Datasets with disk in between:
  1. read + normalise (+ filters, dedup): every input record ends as one row, kept or rejected with a reason.
     Kept rows go to `filtered/`, rejects to `quarantine/`. This is the expensive part and runs once.
  2. mix + tokenize + pack: draws a mixture from `filtered/` by source weights. Sweeps call this alone to
     redraw a mixture for each trial without reading or filtering again.

Inside Ray Data rows carry `messages` as JSON text: one stable Arrow type for kept and rejected rows alike.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from instune.atomic import atomic_dir, write_json
from instune.data.filters import build_checks
from instune.data.schema import REJECT_COLUMNS
from instune.errors import UserError

ROW_COLUMNS = ("kind", "id", "source", "domain", "messages", "metadata") + tuple(
    c for c in REJECT_COLUMNS if c != "source")
MANIFEST = "manifest.json"


@dataclass
class SourceFiles:
    name: str
    domain: str
    format: str
    field_map: dict | None
    files: list[str]


def plan_sources(sources) -> list[SourceFiles]:
    """Expand every source's paths before any work starts; a missing or empty path is a UserError."""
    from instune.data.read import expand_paths

    return [SourceFiles(s.name, s.domain, s.format, s.field_map, expand_paths(s.name, s.path)) for s in sources]


def _row(kind: str, record: dict | None = None, reject: dict | None = None) -> dict:
    row = dict.fromkeys(ROW_COLUMNS, "")
    row["kind"] = kind
    if record is not None:
        row.update(record, messages=json.dumps(record["messages"], ensure_ascii=False))
    if reject is not None:
        row.update(reject)
        row["id"] = f"{reject['source']}:{Path(reject['file']).name}:{reject['record']}"
    return row


def read_file_rows(task: dict, max_record_bytes: int) -> list[dict]:
    """All rows (kept and rejected) of one file; runs inside a Ray task."""
    from instune.data.formats import to_canonical
    from instune.data.read import iter_raw_records

    field_map = json.loads(task["field_map"]) if task["field_map"] else None
    items = iter_raw_records(task["file"], max_record_bytes)
    return [_row(kind, record=value) if kind == "kept" else _row("rejected", reject=value)
            for kind, value in to_canonical(items, task["source"], task["domain"], task["format"],
                                            field_map, task["file"])]


def read_all(sources: list[SourceFiles], max_record_bytes: int):
    """One Ray Dataset of every record of every file, one read task per file."""
    import ray.data

    tasks = [{"file": f, "source": s.name, "domain": s.domain, "format": s.format,
              "field_map": json.dumps(s.field_map) if s.field_map else ""}
             for s in sources for f in s.files]
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    return ds.flat_map(read_file_rows, fn_kwargs={"max_record_bytes": max_record_bytes})


def count_by(ds, columns: list[str]) -> dict[tuple, int]:
    return {tuple(r[c] for c in columns): r["count()"] for r in ds.groupby(columns).count().take_all()}


def check_accounting(read_counts: dict, kept: dict, rejected: dict) -> None:
    """Every record read is kept or rejected, per source; a mismatch is a bug, so it is an assertion."""
    for source, read in read_counts.items():
        k, r = kept.get(source, 0), rejected.get(source, 0)
        assert read == k + r, f"source {source}: read {read} != kept {k} + rejected {r}"


def parse_messages(batch):
    """JSON-text messages (as staged) back to a list of {role, content} structs, for filters and dedup."""
    import pyarrow as pa

    messages = pa.array([json.loads(m) for m in batch["messages"].to_pylist()],
                        pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))
    return batch.set_column(batch.schema.get_field_index("messages"), "messages", messages)


# Order in which records can be rejected; the report lists stages in this order.
STAGES = ("read", "normalise", "filter:length", "filter:quality", "filter:language", "filter:decontaminate",
          "dedup:exact", "dedup:near")


def stage_table(read_counts: dict, reject_counts: dict) -> dict:
    """Per source, per stage: records in, rejected, out (each stage's out is the next one's in)."""
    table = {}
    for source, read in read_counts.items():
        remaining, rows = read, []
        for stage in STAGES:
            rejected = sum(n for (s, st, _), n in reject_counts.items() if s == source and st == stage)
            rows.append({"stage": stage, "in": remaining, "rejected": rejected, "out": remaining - rejected})
            remaining -= rejected
        table[source] = rows
    return table


def filter_and_split(sources: list[SourceFiles], data_config, out_dir: Path, checks: list) -> dict:
    """Phase 1: read, normalise, filter, dedup; kept rows to `filtered/`, every reject to `quarantine/`.

    Returns per-source counts: read, kept, rejected, per-stage table and rejects by reason.
    """
    import shutil

    import ray.data

    from instune.data.dedup.exact import exact_dedup
    from instune.data.dedup.minhash import near_dedup
    from instune.data.filters import filter_dataset

    staging = out_dir / ".staging"
    read_all(sources, data_config.max_record_bytes).write_parquet(str(staging))
    annotated = ray.data.read_parquet(str(staging))
    rejects = [annotated.filter(expr="kind == 'rejected'").select_columns(list(REJECT_COLUMNS))]
    kept = (annotated.filter(expr="kind == 'kept'").select_columns(["id", "source", "domain", "messages", "metadata"])
            .map_batches(parse_messages, batch_format="pyarrow"))
    if checks:
        print("[prepare] filtering", flush=True)
        kept, rejected = filter_dataset(kept, checks)
        rejects.append(rejected)
    if data_config.dedup.exact:
        print("[prepare] exact deduplication", flush=True)
        kept, rejected = exact_dedup(kept)
        rejects.append(rejected)
    near = data_config.dedup.near
    if near is not None:
        print("[prepare] near-duplicate deduplication (MinHash LSH)", flush=True)
        kept, rejected = near_dedup(kept, near.threshold, near.num_perm, near.ngram, near.seed)
        rejects.append(rejected)
    kept.write_parquet(str(out_dir / "filtered"))
    rejects[0].union(*rejects[1:]).write_parquet(str(out_dir / "quarantine")) if len(rejects) > 1 \
        else rejects[0].write_parquet(str(out_dir / "quarantine"))

    names = [s.name for s in sources]
    read_counts = {n: 0 for n in names}
    for (source,), n in count_by(annotated, ["source"]).items():
        read_counts[source] = n
    filtered = ray.data.read_parquet(str(out_dir / "filtered"))
    kept_counts = {n: 0 for n in names}
    if filtered.count():
        for (source,), n in count_by(filtered, ["source"]).items():
            kept_counts[source] = n
    quarantine = ray.data.read_parquet(str(out_dir / "quarantine"))
    reject_counts = count_by(quarantine, ["source", "stage", "reason"]) if quarantine.count() else {}
    rejected_counts = {n: sum(v for (s, _, _), v in reject_counts.items() if s == n) for n in names}
    check_accounting(read_counts, kept_counts, rejected_counts)
    shutil.rmtree(staging, ignore_errors=True)
    stages = stage_table(read_counts, reject_counts)
    by_reason: dict = {}
    for (source, stage, reason), n in sorted(reject_counts.items(), key=lambda kv: -kv[1]):
        by_reason.setdefault(source, []).append({"stage": stage, "reason": reason, "count": n})
    return {n: {"read": read_counts[n], "kept": kept_counts[n], "rejected": rejected_counts[n],
                "stages": stages[n], "rejects": by_reason.get(n, [])} for n in names}


def unit_hash(seed: int, key: str) -> float:
    """A reproducible uniform number in [0, 1) for `key`, the same on every worker and every run."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def mixture_copies(kept: dict[str, int], weights: dict[str, float], size: int | None) -> dict[str, float]:
    """Copies of each record per source so that the mixture has `size` records in the ratio of `weights`.

    A source smaller than its share is upsampled (copies > 1); no `size` keeps every record once.
    """
    if size is None:
        return {s: (1.0 if weights[s] > 0 else 0.0) for s in kept}
    total = sum(weights[s] for s in kept if kept[s])
    if total == 0:
        raise UserError("data.sources: every source with records has weight 0")
    return {s: (size * weights[s] / total / kept[s] if kept[s] else 0.0) for s in kept}


def draw_copies(row: dict, copies_by_source: dict, seed: int) -> list[dict]:
    copies = copies_by_source[row["source"]]
    whole = int(copies)
    extra = 1 if unit_hash(seed, row["id"]) < copies - whole else 0
    return [dict(row, copy=i) for i in range(whole + extra)]


class TokenizeAndPack:
    """Ray Data actor: holds the tokenizer; turns a batch of records into packed (or padded) rows."""

    def __init__(self, tokenizer_path: str, seq_len: int, truncation: str, pack: bool):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.seq_len, self.truncation, self.pack = seq_len, truncation, pack

    def __call__(self, batch: dict) -> dict:
        from instune.data.pack import pack, pad_one
        from instune.data.tokenize import Tokenized, tokenize_batch

        conversations = batch["messages"].to_pylist()
        results = tokenize_batch(conversations, self.tokenizer, self.seq_len, self.truncation)
        examples = [(t.input_ids, t.labels) for t in results if isinstance(t, Tokenized)]
        pad_id = self.tokenizer.pad_token_id
        rows = pack(examples, self.seq_len, pad_id) if self.pack else \
            [pad_one(i, l, self.seq_len, pad_id) for i, l in examples]
        out = {k: [r[k] for r in rows] for k in ("input_ids", "labels", "position_ids", "num_examples",
                                                 "num_target_tokens")}
        out["dropped"] = [len(results) - len(examples)] + [0] * (len(rows) - 1) if rows else []
        return out


def mix_tokenize_pack(filtered_dir: Path, kept: dict[str, int], weights: dict[str, float], *, size: int | None,
                      seed: int, tokenizer_path: str, seq_len: int, truncation: str, pack: bool,
                      validation_fraction: float = 0.0, concurrency: int = 1):
    """Phase 2, lazily: (train dataset, validation dataset or None, copies per source)."""
    import ray.data

    copies = mixture_copies(kept, weights, size)
    records = ray.data.read_parquet(str(filtered_dir))
    if validation_fraction:
        validation = records.filter(lambda r: unit_hash(seed + 1, r["id"]) < validation_fraction)
        records = records.filter(lambda r: unit_hash(seed + 1, r["id"]) >= validation_fraction)
    mixed = records.flat_map(draw_copies, fn_kwargs={"copies_by_source": copies, "seed": seed})
    # Shuffle before packing so bins mix sources; the local shuffle buffer keeps it streaming.
    mixed = mixed.random_shuffle(seed=seed)
    tokenize = dict(fn_constructor_kwargs={"tokenizer_path": tokenizer_path, "seq_len": seq_len,
                                           "truncation": truncation, "pack": pack},
                    batch_size=1024, concurrency=concurrency, batch_format="pyarrow")
    train = mixed.map_batches(TokenizeAndPack, **tokenize)
    val = validation.map_batches(TokenizeAndPack, **tokenize) if validation_fraction else None
    return train, val, copies


def token_counter(tokenizer_path: str, filters):
    """A token-counting function for the length filter, only when a token bound is set."""
    length = filters.length
    if length is None or all(getattr(length, f) is None for f in
                             ("min_turn_tokens", "max_turn_tokens", "min_tokens", "max_tokens")):
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare(config, tokenizer_path: str, data_dir: Path, eval_texts: list[str] = ()) -> dict:
    """Run both phases into `data_dir` (written whole, then renamed); return the manifest."""
    import ray.data

    d = config.data
    sources = plan_sources(d.sources)
    started = time.time()
    with atomic_dir(data_dir) as tmp:
        print(f"[prepare] reading {sum(len(s.files) for s in sources)} files from {len(sources)} sources",
              flush=True)
        checks = build_checks(d.filters, token_counter(tokenizer_path, d.filters), eval_texts)
        counts = filter_and_split(sources, d, tmp, checks)
        kept = {s: c["kept"] for s, c in counts.items()}
        weights = {s.name: s.weight for s in d.sources}
        train, val, copies = mix_tokenize_pack(
            tmp / "filtered", kept, weights, size=d.mix_size, seed=d.seed, tokenizer_path=tokenizer_path,
            seq_len=config.model.max_length, truncation=d.truncation, pack=d.pack,
            validation_fraction=d.validation_fraction)
        train.write_parquet(str(tmp / "train"))
        if val is not None:
            val.write_parquet(str(tmp / "validation"))
        stats = {}
        for split in ("train", "validation"):
            if (tmp / split).exists():
                ds = ray.data.read_parquet(str(tmp / split))
                stats[split] = {
                    "rows": ds.count(),
                    "examples": int(ds.sum("num_examples") or 0),
                    "target_tokens": int(ds.sum("num_target_tokens") or 0),
                    "dropped_too_long": int(ds.sum("dropped") or 0),
                }
        if not stats.get("train", {}).get("rows"):
            raise UserError("data: no training examples left after reading and filtering "
                            f"(see {data_dir}/quarantine for why records were rejected)")
        manifest = {
            "config": config.model_dump(mode="json"),
            "sources": counts,
            "mixture": {"weights": weights, "copies_per_record": copies},
            "splits": stats,
            "seq_len": config.model.max_length,
            "tokenizer_path": tokenizer_path,
            "files": {str(p.relative_to(tmp)): file_digest(p) for p in sorted(tmp.rglob("*.parquet"))},
            "seconds": round(time.time() - started, 1),
        }
        write_json(tmp / MANIFEST, manifest)
    return manifest


def load_manifest(data_dir: Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{data_dir}: no {MANIFEST}, so this is not a complete prepared dataset "
                        "(run `instune prepare` first)")
    return json.loads(path.read_text())
