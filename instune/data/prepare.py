"""`instune prepare`: raw corpora -> filtered per-source records -> mixed, tokenized, packed shards.

Two phases, both streaming Ray Datasets with disk in between:
  1. read + normalise (+ filters, dedup): every input record ends as one row, kept or rejected with a reason.
     Kept rows go to `filtered/`, rejects to `quarantine/`. This is the expensive part and runs once.
     With `data.score` set, a reference model scores what survives dedup and selects by score (stage "score").
  2. mix + tokenize + pack: draws a mixture from `filtered/` by source weights, adds outcome markers, and
     tokenizes and packs. Sweeps call this alone to redraw a mixture for each trial without reading or
     filtering again; with `data.stream` training consumes it directly (`stream_train_data`) and nothing
     is written.

Every record is accounted for: read == kept + rejected per source and per stage in phase 1, and in phase 2
every record drawn into a split is packed or dropped at tokenization (with its reason). The manifest holds
these counts, the requested and realised mixture, and `report/` a readable report with figures.

Layout: filtered/ and quarantine/ (phase 1), train/ and validation/ (packed rows), dropped/<split>/ (records
dropped at tokenization, with reasons), adjusted/<split>/ (records the chat template needed an adjustment for,
chat_template.py), report/ (report.md and figures), manifest.json; written whole or not at all (atomic_dir).

Every stage of phase 1 writes its rejects straight to `quarantine/` from the task that finds them
(instune.data.rejects) and passes only its kept records on, so reading and filtering are one streaming pass.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from instune.atomic import atomic_dir, write_json
from instune.data.filters import build_checks
from instune.data.outcome import OutcomeMarkers
from instune.data.raydata import cluster_cpus, read_parquet, task_shuffle
from instune.data.tokenize import TokenizerParts
from instune.errors import UserError

MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
# The canonical record (schema.py) as reading yields it: messages as structs, so no block's types depend on
# which rows it happens to hold.
RECORD_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("domain", pa.string()),
                           ("messages", MESSAGES_TYPE), ("metadata", pa.string())])
# Rows per Arrow table a read task yields: Ray Data cuts blocks from these as they come.
READ_TABLE_ROWS = 2048
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


def read_file_tables(tasks: pa.Table, max_record_bytes: int, quarantine: str, counts_dir: str):
    """The kept records of each file in `tasks`, as RECORD_SCHEMA tables of READ_TABLE_ROWS; runs in a Ray task.

    A generator, so a worker never holds a whole file. Rejects go to `quarantine` as they gather
    (rejects.write_rejects); once a file is done, the number of records read from it goes to
    `counts_dir/<task index>.json`: the accounting's "read", counted by the reader itself.
    """
    from instune.atomic import write_json
    from instune.data.formats import to_canonical
    from instune.data.read import iter_raw_records
    from instune.data.rejects import write_rejects

    for task in tasks.to_pylist():
        field_map = json.loads(task["field_map"]) if task["field_map"] else None
        items = iter_raw_records(task["file"], max_record_bytes)
        kept, rejected, read = [], [], 0
        for kind, value in to_canonical(items, task["source"], task["domain"], task["format"], field_map,
                                        task["file"]):
            read += 1
            if kind != "kept":
                rejected.append(value)
                if len(rejected) == READ_TABLE_ROWS:
                    write_rejects(rejected, quarantine)
                    rejected = []
                continue
            kept.append(value)
            if len(kept) == READ_TABLE_ROWS:
                yield pa.Table.from_pylist(kept, schema=RECORD_SCHEMA)
                kept = []
        if kept:
            yield pa.Table.from_pylist(kept, schema=RECORD_SCHEMA)
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


def _group_counts(batch: pa.Table, columns: list[str]) -> pa.Table:
    return batch.group_by(columns).aggregate([([], "count_all")])


def count_rows_of(table: pa.Table, columns: list[str]) -> dict[tuple, int]:
    """{(values of `columns`): rows} of an Arrow table."""
    return {tuple(row[c] for c in columns): row["count_all"] for row in _group_counts(table, columns).to_pylist()}


def read_columns(directory: str | Path, columns: list[str]) -> pa.Table | None:
    """`columns` of every Parquet file under `directory`, read in this process; None when there are none.

    For the small columns the accounting needs (sources, ids): one pyarrow read costs a fraction of the
    second that starting a Ray Data job does.
    """
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    from instune.storage import resolve

    fs, path = resolve(directory)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=columns)
    return table if table.num_rows else None


def count_rows(directory: str | Path, columns: list[str]) -> dict[tuple, int]:
    """{(values of `columns`): rows} over the Parquet files under `directory`."""
    table = read_columns(directory, columns)
    if table is None:
        return {}
    return count_rows_of(table, columns)


_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_KIND_OF_STAGE = {"dedup:exact": "exact duplicate", "dedup:near": "near-duplicate"}


def reason_kind(stage: str, reason: str) -> str:
    """The reason with its particulars (numbers, duplicate ids) taken out, so rejects group into a few kinds.

    "record is 5123 bytes, over max_record_bytes (4096)" -> "record is N bytes, over max_record_bytes (N)".
    """
    return _KIND_OF_STAGE.get(stage) or _NUMBER.sub("N", reason)


_KIND_KEYS = ["source", "stage", "reason_kind"]


def _reject_kind_counts(batch: pa.Table) -> pa.Table:
    kinds = [reason_kind(stage, reason) for stage, reason in zip(batch["stage"].to_pylist(),
                                                                 batch["reason"].to_pylist())]
    batch = batch.append_column("reason_kind", pa.array(kinds, pa.string()))
    return batch.group_by(_KIND_KEYS).aggregate([([], "count_all"), ("reason", "min"), ("example", "min")])


def reject_kinds(quarantine: Path) -> list[dict]:
    """[{source, stage, reason (a kind), count, example_reason, example}] over every reject, one row per kind.

    Read here, a batch at a time and only the columns it needs, and grouped per batch: there are few kinds,
    however many rejects, and a Ray job would cost more than the read.
    """
    import pyarrow.dataset as pads

    from instune.data.raydata import has_parquet

    merged: dict[tuple, dict] = {}
    if not has_parquet(quarantine):
        return []
    columns = ["source", "stage", "reason", "example"]
    for batch in pads.dataset(str(quarantine), format="parquet").to_batches(columns=columns):
        for row in _reject_kind_counts(pa.Table.from_batches([batch])).to_pylist():
            key = tuple(row[k] for k in _KIND_KEYS)
            kind = merged.setdefault(key, {"source": key[0], "stage": key[1], "reason": key[2], "count": 0,
                                           "example_reason": row["reason_min"], "example": row["example_min"]})
            kind["count"] += row["count_all"]
            kind["example_reason"] = min(kind["example_reason"], row["reason_min"])
            kind["example"] = min(kind["example"], row["example_min"])
    return list(merged.values())


def check_accounting(read_counts: dict, kept: dict, rejected: dict) -> None:
    """Every record read is kept or rejected, per source; a mismatch is a bug, so it is an assertion."""
    for source, read in read_counts.items():
        k, r = kept.get(source, 0), rejected.get(source, 0)
        assert read == k + r, f"source {source}: read {read} != kept {k} + rejected {r}"


# Order in which records can be rejected; the report lists stages in this order.
STAGES = ("read", "normalise", "filter:length", "filter:quality", "filter:language", "filter:decontaminate",
          "dedup:exact", "dedup:near", "score")


def stage_table(read_counts: dict, reject_counts: dict) -> dict:
    """Per source, per stage: records in, rejected, out (each stage's out is the next one's in).

    `reject_counts` maps (source, stage, reason) to a count.
    """
    table = {}
    for source, read in read_counts.items():
        remaining, rows = read, []
        for stage in STAGES:
            rejected = sum(n for (s, st, _), n in reject_counts.items() if s == source and st == stage)
            rows.append({"stage": stage, "in": remaining, "rejected": rejected, "out": remaining - rejected})
            remaining -= rejected
        table[source] = rows
    return table


def filter_and_split(sources: list[SourceFiles], data_config, out_dir: Path, checks: list,
                     scoring: dict | None = None) -> dict:
    """Phase 1: read, normalise, filter, dedup, score; kept rows to `filtered/`, every reject to `quarantine/`.

    `scoring` holds the keyword arguments of `score.score_dataset` (but `num_gpus`), or None for no scoring.
    Returns per-source counts: read, kept, rejected, per-stage table and rejects by kind of reason.
    """
    import shutil

    import ray

    from instune.data.dedup.exact import exact_dedup
    from instune.data.dedup.minhash import near_dedup
    from instune.data.filters import filter_dataset

    # Every stage writes its rejects to the quarantine as it goes (instune.data.rejects) and passes its kept
    # records on, so reading and filtering stream through in one pass. Dedup and scoring need the whole corpus
    # before they can decide, so their inputs are computed once and stored under `work` (raydata.persist).
    quarantine = str(out_dir / "quarantine")
    work = out_dir / ".work"
    kept = read_all(sources, data_config.max_record_bytes, quarantine, str(work / "read"))
    if checks:
        print("[prepare] filtering", flush=True)
        kept, _ = filter_dataset(kept, checks, quarantine=quarantine)
    if data_config.dedup.exact:
        print("[prepare] exact deduplication", flush=True)
        kept, _ = exact_dedup(kept, str(work / "exact"), quarantine)
    near = data_config.dedup.near
    if near is not None:
        print("[prepare] near-duplicate deduplication (MinHash LSH)", flush=True)
        kept, _ = near_dedup(kept, near.threshold, near.num_perm, near.ngram, near.seed, str(work / "near"),
                             quarantine)
    if scoring is not None:
        from instune.data.score import score_dataset

        # One GPU per scoring actor where the cluster has GPUs; otherwise the model runs on CPU.
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        print(f"[prepare] scoring with the reference model ({scoring['metric']}, "
              f"{'GPU' if num_gpus else 'CPU'})", flush=True)
        kept, _ = score_dataset(kept, num_gpus=num_gpus, work_dir=str(work / "score"), quarantine=quarantine,
                                **scoring)
    kept.write_parquet(str(out_dir / "filtered"))
    del kept  # its blocks are on disk now; let the object store have the memory back

    names = [s.name for s in sources]
    read_counts_by_source = read_counts(work / "read", sources)
    kept_counts = {n: 0 for n in names}
    for (source,), n in count_rows(out_dir / "filtered", ["source"]).items():
        kept_counts[source] = n
    kinds = reject_kinds(out_dir / "quarantine")
    reject_counts = Counter()
    for k in kinds:
        reject_counts[(k["source"], k["stage"], k["reason"])] += k["count"]
    rejected_counts = {n: sum(v for (s, _, _), v in reject_counts.items() if s == n) for n in names}
    check_accounting(read_counts_by_source, kept_counts, rejected_counts)
    shutil.rmtree(work, ignore_errors=True)
    # The driver grouped keys and verified candidate pairs; give what that took back before phase 2, or its
    # memory grows with the corpus for the rest of the run (Arrow's allocator keeps freed pages for reuse).
    gc.collect()
    pa.default_memory_pool().release_unused()
    stages = stage_table(read_counts_by_source, reject_counts)
    by_reason: dict = {}
    for k in sorted(kinds, key=lambda k: (STAGES.index(k["stage"]), -k["count"], k["reason"])):
        by_reason.setdefault(k["source"], []).append({key: k[key] for key in k if key != "source"})
    return {n: {"read": read_counts_by_source[n], "kept": kept_counts[n], "rejected": rejected_counts[n],
                "stages": stages[n], "rejects": by_reason.get(n, [])} for n in names}


def phase1_line(counts: dict, files: int, seconds: float) -> str:
    """One progress line: records read, kept, rejected, and rejects per stage."""
    read, kept = sum(c["read"] for c in counts.values()), sum(c["kept"] for c in counts.values())
    per_stage = Counter()
    for c in counts.values():
        for row in c["stages"]:
            per_stage[row["stage"]] += row["rejected"]
    stages = ", ".join(f"{stage} {per_stage[stage]}" for stage in STAGES if per_stage[stage])
    return (f"[prepare] phase 1 (read, filter, dedup, score): {read} records from {files} files -> kept {kept}, "
            f"rejected {read - kept}{f' ({stages})' if stages else ''} in {seconds:.1f} s")


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


def requested_fractions(kept: dict[str, int], weights: dict[str, float], size: int | None) -> dict[str, float]:
    """The share of the mixture each source is expected to hold: by weight with a size, by records without."""
    copies = mixture_copies(kept, weights, size)
    expected = {s: kept[s] * copies[s] for s in kept}
    total = sum(expected.values())
    return {s: (expected[s] / total if total else 0.0) for s in kept}


def copies_drawn(record_id: str, copies: float, seed: int) -> int:
    """Copies of one record in the mixture: the whole part of `copies`, plus one with the fraction's chance."""
    whole = int(copies)
    return whole + (1 if unit_hash(seed, record_id) < copies - whole else 0)


def in_validation(record_id: str, seed: int, validation_fraction: float) -> bool:
    return unit_hash(seed + 1, record_id) < validation_fraction


def draw_batch(batch: pa.Table, split: str, copies_by_source: dict[str, float], seed: int,
               validation_fraction: float) -> pa.Table:
    """The batch's records that belong to `split`, each repeated as often as the mixture draws it (train),
    or once (validation), with a `copy` column numbering the repeats."""
    take, copy = [], []
    for row, (record_id, source) in enumerate(zip(batch["id"].to_pylist(), batch["source"].to_pylist())):
        held_out = bool(validation_fraction) and in_validation(record_id, seed, validation_fraction)
        if held_out != (split == "validation"):
            continue
        n = 1 if held_out else copies_drawn(record_id, copies_by_source[source], seed)
        take += [row] * n
        copy += range(n)
    return batch.take(pa.array(take, pa.int64())).append_column("copy", pa.array(copy, pa.int64()))


DROP_SCHEMA = pa.schema([("source", pa.string()), ("id", pa.string()), ("reason", pa.string())])
# A record the chat template needed an adjustment for (chat_template.py), one row per adjustment; `extra_examples`
# counts the examples beyond the first that an expanded record became.
ADJUSTED_SCHEMA = pa.schema([("source", pa.string()), ("id", pa.string()), ("adjustment", pa.string()),
                             ("extra_examples", pa.int64())])
# Records per tokenize-and-pack call: bins are packed within one batch, so larger batches pack fuller rows.
TOKENIZE_BATCH_ROWS = 2048


class TokenizeAndPack:
    """Holds the tokenizer; turns a batch of records into packed (or padded) rows (`tokenize_and_pack`).

    Outcome markers are added to the prompts first. Every row lists the source of each example in it.
    Records that cannot be trained on (over max_length with truncation "drop", no assistant token left after
    truncation) are written to `drops_dir` when it is given: one small Parquet file per batch, named by the
    records in it, so a retried batch rewrites its own file rather than counting twice; records the chat
    template adjusted (expanded into several examples, a convention applied) go to `adjusted_dir` the same way.
    Given the tokenizer's `tokenizer_parts`, it never loads the tokenizer through transformers (see TokenizerParts).
    """

    def __init__(self, tokenizer_path: str, seq_len: int, truncation: str, pack: bool,
                 outcome_markers: OutcomeMarkers | None = None, drops_dir: str | None = None,
                 serial_tokenizer: bool = False, tokenizer_parts: TokenizerParts | None = None,
                 adjusted_dir: str | None = None, join_turns: bool = False):
        if serial_tokenizer:
            # With a task per CPU, the Rust tokenizer's own thread pool on top oversubscribes the cores: its
            # threads cost half again the CPU of one thread for the same batch. A lone task keeps its threads.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        if tokenizer_parts is not None:
            self.tokenizer, self.pad_token_id = None, tokenizer_parts.pad_token_id
            self.render, self.backend = tokenizer_parts.build()
        else:
            from transformers import AutoTokenizer

            from instune.data.tokenize import ChatRenderer, rust_tokenizer
            from instune.model_source import local_model_dir

            self.tokenizer = AutoTokenizer.from_pretrained(local_model_dir(tokenizer_path))
            self.pad_token_id = self.tokenizer.pad_token_id
            self.render, self.backend = ChatRenderer(self.tokenizer), rust_tokenizer(self.tokenizer)
        self.seq_len, self.truncation, self.pack = seq_len, truncation, pack
        self.outcome_markers, self.drops_dir = outcome_markers, drops_dir
        self.adjusted_dir, self.join_turns = adjusted_dir, join_turns

    def __call__(self, batch: pa.Table) -> pa.Table:
        from instune.data.outcome import mark_outcome
        from instune.data.pack import pack_bins, rows_table, single_bins
        from instune.data.tokenize import TokenizeError, encode_conversations

        conversations = batch["messages"].to_pylist()
        sources = batch["source"].to_pylist()
        if self.outcome_markers is not None:
            conversations = [mark_outcome(messages, metadata, self.outcome_markers)[0]
                             for messages, metadata in zip(conversations, batch["metadata"].to_pylist())]
        results = encode_conversations(conversations, self.tokenizer, self.seq_len, self.truncation,
                                       self.render, self.backend, self.join_turns)
        examples = [(*example, source) for r, source in zip(results, sources) if not isinstance(r, TokenizeError)
                    for example in r.examples]
        if self.drops_dir and any(isinstance(r, TokenizeError) for r in results):
            self.write_drops(batch, results)
        if self.adjusted_dir and any(not isinstance(r, TokenizeError) and r.notes for r in results):
            self.write_adjusted(batch, results)
        bins = pack_bins(examples, self.seq_len, self.pad_token_id) if self.pack else single_bins(examples)
        return rows_table(bins, self.seq_len, self.pad_token_id)

    @staticmethod
    def record_keys(batch: pa.Table) -> list[str]:
        """Each record's id with its copy number: a record drawn twice into a mixture is two records here."""
        copies = batch["copy"].to_pylist() if "copy" in batch.column_names else [0] * batch.num_rows
        return [f"{record_id}#{copy}" for record_id, copy in zip(batch["id"].to_pylist(), copies)]

    def write_adjusted(self, batch: pa.Table, results: list) -> None:
        from instune.data.chat_template import EXPANDED
        from instune.data.rejects import write_once
        from instune.data.tokenize import TokenizeError

        rows = [{"source": source, "id": key, "adjustment": note,
                 "extra_examples": len(result.examples) - 1 if note == EXPANDED else 0}
                for source, key, result in zip(batch["source"].to_pylist(), self.record_keys(batch), results)
                if not isinstance(result, TokenizeError) for note in result.notes]
        write_once(pa.Table.from_pylist(rows, schema=ADJUSTED_SCHEMA), self.adjusted_dir,
                   "\n".join(sorted({r["id"] for r in rows})))

    def write_drops(self, batch: pa.Table, results: list) -> None:
        from instune.data.rejects import write_once
        from instune.data.tokenize import TokenizeError

        dropped = [(source, key, str(result))
                   for source, key, result in zip(batch["source"].to_pylist(), self.record_keys(batch), results)
                   if isinstance(result, TokenizeError)]
        write_once(pa.Table.from_pylist([dict(zip(DROP_SCHEMA.names, d)) for d in dropped], schema=DROP_SCHEMA),
                   self.drops_dir, "\n".join(sorted(d[1] for d in dropped)))


# Records per block going into phase 2's random shuffle.
SHUFFLE_BLOCK_ROWS = 20_000


def shuffle_blocks(directory: str | Path) -> int:
    """Blocks to read `directory` into for the random shuffle: four per CPU, or more for a large corpus.

    Not one per file: the shuffle cuts every input block into one piece per output block, and the driver keeps
    metadata for each piece, so with the few hundred files of a 200 MB corpus its memory grew with the square
    of the corpus.
    """
    import pyarrow.dataset as pads

    from instune.storage import resolve

    fs, path = resolve(directory)
    rows = pads.dataset(path, filesystem=fs, format="parquet").count_rows()
    return max(4 * cluster_cpus(), -(-rows // SHUFFLE_BLOCK_ROWS))


def start_loading_tokenizer_parts(tokenizer_path: str):
    """A Ray object ref to the TokenizerParts of the tokenizer at `tokenizer_path` (None for one without).

    Loaded by a task whose worker exits after it, with torch hidden from transformers (load_tokenizer_parts):
    2 s of CPU instead of 6, and nothing of transformers stays in memory for the rest of the run. It takes no
    CPU slot, so it runs beside the work in hand.
    """
    import ray

    from instune.data.tokenize import load_tokenizer_parts

    return ray.remote(num_cpus=0, max_calls=1)(load_tokenizer_parts).remote(tokenizer_path, hide_torch=True)


_STEPS: dict[str, TokenizeAndPack] = {}


def tokenize_and_pack(batch: pa.Table, **step_arguments) -> pa.Table:
    """Ray Data task: `TokenizeAndPack(**step_arguments)(batch)`, the step built once per worker process.

    Tasks rather than an actor pool: tasks take every free CPU as soon as the shuffle before them is done,
    where Ray Data's actor pool grew from one actor only slowly (one actor tokenized the whole corpus on a
    2-CPU node); and Ray keeps its worker processes, so each loads the tokenizer once.
    """
    key = repr(sorted(step_arguments.items()))
    if key not in _STEPS:
        _STEPS[key] = TokenizeAndPack(**step_arguments)
    return _STEPS[key](batch)


def mix_tokenize_pack(filtered_dir: Path, kept: dict[str, int], weights: dict[str, float], *, size: int | None,
                      seed: int, tokenizer_path: str, seq_len: int, truncation: str, pack: bool,
                      validation_fraction: float = 0.0, concurrency: int | None = 1,
                      outcome_markers: OutcomeMarkers | None = None, drops_dir: Path | None = None,
                      adjusted_dir: Path | None = None, join_turns: bool = False,
                      batch_size: int = TOKENIZE_BATCH_ROWS, tokenizer_parts: TokenizerParts | None = None):
    """Phase 2, lazily: (train dataset, validation dataset or None, copies per source).

    `size` is the size of the train mixture: with a validation split, copies are worked out over the records
    outside it (one pass over the ids). With `drops_dir`, records dropped at tokenization are written under
    `drops_dir/<split>/`, and records the chat template adjusted under `adjusted_dir/<split>/`. `concurrency` caps the tokenize tasks running at once; None runs one per CPU.
    `tokenizer_parts` (of the tokenizer at `tokenizer_path`) is loaded here when not given.
    """
    import ray

    if validation_fraction:
        held_in = drawn_counts(filtered_dir, "train", dict.fromkeys(kept, 1.0), seed, validation_fraction)
        kept = {s: held_in.get(s, 0) for s in kept}
    copies = mixture_copies(kept, weights, size)
    records = task_shuffle(read_parquet(str(filtered_dir), override_num_blocks=shuffle_blocks(filtered_dir)))
    tasks = concurrency or cluster_cpus()
    if tokenizer_parts is None:
        tokenizer_parts = ray.get(start_loading_tokenizer_parts(tokenizer_path))

    def split(name: str):
        drawn = records.map_batches(draw_batch, batch_format="pyarrow", fn_kwargs={
            "split": name, "copies_by_source": copies, "seed": seed, "validation_fraction": validation_fraction})
        if name == "train":
            # A global shuffle, so bins mix sources and training sees them interleaved; Ray Data spills it to
            # disk when it outgrows the object store.
            drawn = drawn.random_shuffle(seed=seed)
        return drawn.map_batches(
            tokenize_and_pack, batch_size=batch_size, concurrency=concurrency, batch_format="pyarrow",
            fn_kwargs={"tokenizer_path": tokenizer_path, "seq_len": seq_len, "truncation": truncation,
                       "pack": pack, "outcome_markers": outcome_markers,
                       "drops_dir": str(drops_dir / name) if drops_dir else None, "serial_tokenizer": tasks > 1,
                       "tokenizer_parts": tokenizer_parts, "join_turns": join_turns,
                       "adjusted_dir": str(adjusted_dir / name) if adjusted_dir else None})

    return split("train"), split("validation") if validation_fraction else None, copies


# ---------------------------------------------------------------- phase 2 accounting


def drawn_counts(filtered_dir: Path, split: str, copies: dict[str, float], seed: int,
                 validation_fraction: float) -> dict[str, int]:
    """{source: records drawn into `split`}, from the ids alone (no messages are read, nothing tokenized)."""
    ids = read_columns(filtered_dir, ["id", "source"])
    if ids is None:
        return {}
    drawn = draw_batch(ids, split, copies, seed, validation_fraction)
    return {source: n for (source,), n in count_rows_of(drawn, ["source"]).items()}


def packed_stats(split_dir: Path, seq_len: int) -> dict:
    """Rows, examples, tokens, packing efficiency and examples per source of a written split.

    Read here with pyarrow, and only the small per-row columns: the token columns are most of the bytes.
    """
    import pyarrow.compute as pc

    stats = {"rows": 0, "examples": 0, "target_tokens": 0, "tokens": 0}
    by_source = Counter()
    table = read_columns(split_dir, ["num_examples", "num_target_tokens", "num_tokens", "sources"])
    if table is not None:
        stats["rows"] = table.num_rows
        for key, column in (("examples", "num_examples"), ("target_tokens", "num_target_tokens"),
                            ("tokens", "num_tokens")):
            stats[key] = int(pc.sum(table[column]).as_py() or 0)
        counts = pc.value_counts(pc.list_flatten(table["sources"]))
        by_source.update({c["values"].as_py(): c["counts"].as_py() for c in counts})
    stats["packing_efficiency"] = round(stats["tokens"] / (stats["rows"] * seq_len), 4) if stats["rows"] else 0.0
    stats["examples_by_source"] = dict(by_source)
    return stats


def dropped_counts(drops_dir: Path) -> dict[str, list[dict]]:
    """{source: [{reason (a kind), count, example_reason}]} from the drop files of one split."""
    kinds: dict[tuple[str, str], list] = {}
    table = read_columns(drops_dir, ["source", "reason"])
    if table is not None:
        for source, reason in zip(table["source"].to_pylist(), table["reason"].to_pylist()):
            entry = kinds.setdefault((source, reason_kind("tokenize", reason)), [0, reason])
            entry[0] += 1
    out: dict[str, list[dict]] = {}
    for (source, kind), (count, example) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
        out.setdefault(source, []).append({"reason": kind, "count": count, "example_reason": example})
    return out


def adjusted_counts(adjusted_dir: Path) -> dict[str, list[dict]]:
    """{source: [{adjustment, records, extra_examples}]} from the adjustment files of one split."""
    counts: dict[tuple[str, str], list[int]] = {}
    table = read_columns(adjusted_dir, ["source", "adjustment", "extra_examples"])
    if table is not None:
        for source, adjustment, extra in zip(*(table[c].to_pylist() for c in table.column_names)):
            entry = counts.setdefault((source, adjustment), [0, 0])
            entry[0] += 1
            entry[1] += extra
    out: dict[str, list[dict]] = {}
    for (source, adjustment), (records, extra) in sorted(counts.items()):
        out.setdefault(source, []).append({"adjustment": adjustment, "records": records, "extra_examples": extra})
    return out


def write_splits(out_dir: Path, kept: dict[str, int], mix: dict) -> tuple[dict, dict]:
    """Phase 2 into `out_dir/train` (and `validation`): (per-split stats, copies per record per source).

    Checks that every record drawn into a split was packed or dropped at tokenization, per source (a record
    the chat template expanded is packed as several examples).
    """
    # Tokenizing is nearly all of the work once the shuffle (a barrier) is done: a task per CPU.
    train, validation, copies = mix_tokenize_pack(out_dir / "filtered", kept, drops_dir=out_dir / "dropped",
                                                  adjusted_dir=out_dir / "adjusted", concurrency=None, **mix)
    train.write_parquet(str(out_dir / "train"))
    if validation is not None:
        validation.write_parquet(str(out_dir / "validation"))
    splits = {}
    for name in ("train", "validation") if validation is not None else ("train",):
        stats = packed_stats(out_dir / name, mix["seq_len"])
        stats["drawn"] = drawn_counts(out_dir / "filtered", name, copies, mix["seed"], mix["validation_fraction"])
        stats["dropped"] = dropped_counts(out_dir / "dropped" / name)
        stats["dropped_total"] = sum(k["count"] for kinds in stats["dropped"].values() for k in kinds)
        stats["adjusted"] = adjusted_counts(out_dir / "adjusted" / name)
        for source, drawn in stats["drawn"].items():
            extra = sum(k["extra_examples"] for k in stats["adjusted"].get(source, []))
            packed = stats["examples_by_source"].get(source, 0) - extra
            dropped = sum(k["count"] for k in stats["dropped"].get(source, []))
            assert drawn == packed + dropped, \
                f"{name} split, source {source}: drawn {drawn} != packed {packed} + dropped at tokenization {dropped}"
        splits[name] = stats
    return splits, copies


def phase2_line(splits: dict, seq_len: int, seconds: float) -> str:
    parts = []
    for name, s in splits.items():
        drawn = sum(s["drawn"].values())
        expanded = sum(k["extra_examples"] for kinds in s.get("adjusted", {}).values() for k in kinds)
        parts.append(f"{name} {drawn} drawn -> {s['examples']} examples in {s['rows']} rows of {seq_len} tokens "
                     f"({s['packing_efficiency']:.0%} full), {s['dropped_total']} dropped at tokenization"
                     + (f", {expanded} examples from expanded conversations" if expanded else ""))
    return f"[prepare] phase 2 (mix, tokenize, pack): {'; '.join(parts)} in {seconds:.1f} s"


def _outcome_counts(batch: pa.Table, field: str) -> pa.Table:
    from instune.data.outcome import outcome_of

    counts = Counter((source, outcome_of(json.loads(metadata) if metadata else {}, field) or "unlabelled")
                     for source, metadata in zip(batch["source"].to_pylist(), batch["metadata"].to_pylist()))
    return pa.table({"source": [k[0] for k in counts], "outcome": [k[1] for k in counts],
                     "count": list(counts.values())})


def outcome_counts(filtered_dir: Path, field: str) -> dict[str, dict[str, int]]:
    """{source: {success, failure, unlabelled}} over the kept records, as the outcome markers will read them."""
    from instune.data.raydata import collect

    counted = collect(read_parquet(str(filtered_dir)).select_columns(["source", "metadata"])
                      .map_batches(_outcome_counts, fn_kwargs={"field": field}, batch_format="pyarrow"))
    out: dict[str, dict[str, int]] = {}
    if counted is not None:
        for source, outcome, n in zip(*(counted[c].to_pylist() for c in ("source", "outcome", "count"))):
            counts = out.setdefault(source, {"success": 0, "failure": 0, "unlabelled": 0})
            counts[outcome] += n
    return out


# ---------------------------------------------------------------- entry points


def token_counter(tokenizer_path: str, filters):
    """A token-counting function for the length filter, only when a token bound is set."""
    length = filters.length
    if length is None or all(getattr(length, f) is None for f in
                             ("min_turn_tokens", "max_turn_tokens", "min_tokens", "max_tokens")):
        return None
    from transformers import AutoTokenizer

    from instune.model_source import local_model_dir

    tokenizer = AutoTokenizer.from_pretrained(local_model_dir(tokenizer_path))
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def score_arguments(score, model_path: str | None, tokenizer_path: str, max_length: int) -> dict:
    """Keyword arguments of `score.score_dataset` from `data.score`; the model defaults to the run's base model."""
    if score.model_path:
        from instune.base_model import check_model_dir
        from instune.model_source import is_remote

        local = check_model_dir(score.model_path, "data.score.model_path")
        if not any((local / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise UserError(f"data.score.model_path: {score.model_path} has no tokenizer files "
                            "(tokenizer.json or tokenizer_config.json)")
        # A Hub id or bucket URI goes to the scoring actors as it is: each node fetches it (model_source.py).
        path = tokenizer = score.model_path if is_remote(score.model_path) else str(local)
    elif model_path:
        path, tokenizer = model_path, tokenizer_path
    else:
        raise UserError("data.score.model_path: not set, and no base model was given to score with")
    return {"model_path": path, "tokenizer_path": tokenizer, "metric": score.metric, "max_length": max_length,
            "batch_size": score.batch_size, "max_batch_tokens": score.max_batch_tokens,
            "num_actors": score.num_actors, "min_score": score.min_score,
            "max_score": score.max_score, "top_fraction": score.top_fraction, "keep": score.keep}


def phase2_arguments(config, tokenizer_path: str) -> dict:
    """Keyword arguments of `mix_tokenize_pack` (but the directory and kept counts) from the config."""
    d = config.data
    markers = OutcomeMarkers(**d.outcome_markers.model_dump()) if d.outcome_markers is not None else None
    return {"weights": {s.name: s.weight for s in d.sources}, "size": d.mix_size, "seed": d.seed,
            "tokenizer_path": tokenizer_path, "seq_len": config.model.max_length, "truncation": d.truncation,
            "pack": d.pack, "validation_fraction": d.validation_fraction, "outcome_markers": markers,
            "join_turns": d.join_consecutive_turns}


def most_common_rejects(counts: dict, limit: int = 3) -> str:
    kinds = Counter()
    for c in counts.values():
        for r in c["rejects"]:
            kinds[(r["stage"], r["reason"])] += r["count"]
    return "; ".join(f"{stage}: {reason} ({n})" for (stage, reason), n in kinds.most_common(limit)) or "none"


def prepare(config, tokenizer_path: str, data_dir: Path, eval_texts: list[str] = (),
            model_path: str | None = None) -> dict:
    """Run both phases into `data_dir` (written whole with its report, then renamed); return the manifest.

    `model_path` (the run's base model) is the default reference model of `data.score`. With `data.stream`
    phase 2 is left to training (`stream_train_data`), and only `filtered/`, `quarantine/` and the manifest
    are written.
    """
    import ray

    from instune.data.report import write_data_report

    d = config.data
    sources = plan_sources(d.sources)
    scoring = score_arguments(d.score, model_path, tokenizer_path, config.model.max_length) if d.score else None
    mix = phase2_arguments(config, tokenizer_path)
    files = sum(len(s.files) for s in sources)
    started = time.time()
    tokenizer_parts = start_loading_tokenizer_parts(tokenizer_path)  # for phase 2, loaded while phase 1 runs
    with atomic_dir(data_dir) as tmp:
        print(f"[prepare] phase 1: reading {files} files from {len(sources)} sources", flush=True)
        checks = build_checks(d.filters, token_counter(tokenizer_path, d.filters), eval_texts)
        counts = filter_and_split(sources, d, tmp, checks, scoring)
        print(phase1_line(counts, files, time.time() - started), flush=True)
        kept = {s: c["kept"] for s, c in counts.items()}
        if not sum(kept.values()):
            raise UserError(f"data: no records left after reading and filtering; most rejects: "
                            f"{most_common_rejects(counts)}")
        splits, copies = {}, mixture_copies(kept, mix["weights"], mix["size"])
        if d.stream:
            print("[prepare] phase 2 left to training (data.stream: true)", flush=True)
        else:
            phase2_started = time.time()
            splits, copies = write_splits(tmp, kept, {**mix, "tokenizer_parts": ray.get(tokenizer_parts)})
            print(phase2_line(splits, mix["seq_len"], time.time() - phase2_started), flush=True)
            if not splits["train"]["rows"]:
                reasons = {k["reason"] for kinds in splits["train"]["dropped"].values() for k in kinds}
                raise UserError(f"data: every record drawn for training was dropped at tokenization "
                                f"({'; '.join(sorted(reasons))}); raise model.max_length or set data.truncation: truncate")
        realised = splits.get("train", {}).get("examples_by_source", {})
        realised_total = sum(realised.values())
        manifest = {
            "config": config.model_dump(mode="json"),
            "sources": counts,
            "mixture": {
                "weights": mix["weights"],
                "copies_per_record": copies,
                "requested": requested_fractions(kept, mix["weights"], mix["size"]),
                "realised": {s: {"examples": realised.get(s, 0),
                                 "fraction": round(realised.get(s, 0) / realised_total, 6) if realised_total else 0.0}
                             for s in kept},
            },
            "splits": splits,
            "streamed": d.stream,
            "seq_len": config.model.max_length,
            "tokenizer_path": tokenizer_path,
        }
        if d.outcome_markers is not None:
            manifest["outcomes"] = outcome_counts(tmp / "filtered", d.outcome_markers.field)
        manifest["files"] = {str(p.relative_to(tmp)): file_digest(p) for p in sorted(tmp.rglob("*.parquet"))}
        manifest["seconds"] = round(time.time() - started, 1)
        report = write_data_report(tmp, manifest, detect_languages=d.filters.language is not None, seed=d.seed)
        manifest["report"] = str(report.relative_to(tmp))
        write_json(tmp / MANIFEST, manifest)
    print(f"[prepare] wrote {data_dir} (report: {data_dir / manifest['report']}) in {manifest['seconds']:.1f} s",
          flush=True)
    return manifest


def stream_train_data(config, tokenizer_path: str, data_dir: Path):
    """(train dataset, validation dataset or None): phase 2 over `data_dir/filtered`, lazily, for training to
    consume as it runs; nothing is written. The mixture, markers and packing come from `config`."""
    manifest = load_manifest(data_dir)
    kept = {s: c["kept"] for s, c in manifest["sources"].items()}
    train, validation, _ = mix_tokenize_pack(Path(data_dir) / "filtered", kept,
                                             **phase2_arguments(config, tokenizer_path))
    return train, validation


def load_manifest(data_dir: str | Path) -> dict:
    """The manifest of the prepared data in `data_dir`, a local path or a URI (instune.storage)."""
    from instune import storage

    path = storage.join(data_dir, MANIFEST)
    if not storage.is_file(path):
        raise UserError(f"{data_dir}: no {MANIFEST}, so this is not a complete prepared dataset "
                        "(run `instune prepare` first)")
    return json.loads(storage.read_text(path))
