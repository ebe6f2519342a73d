"""`instune prepare` for a preference objective: pairs read, filtered, deduplicated, split, tokenized and, for
the reference-based losses with `dpo.reference: precompute`, scored by the frozen reference on Ray Data.

    read + normalise + filter   one Ray task per file (preference_formats, the data.filters checks on each side)
    dedup:exact                 the same prompt, chosen and rejected text; the first by id is kept
    split                       data.validation_fraction of each source's pairs held out, by a hash of the id
    tokenize                    preference_tokenize; a pair that cannot be fitted is dropped with its reason
    reference                   reference_logprobs.add_reference_logprobs (precompute only)
    write                       train/ and validation/ as Parquet, each side padded to model.max_length

Every pair read is kept or rejected with a reason (quarantine/, as for SFT), and the manifest holds pairs
read/kept/rejected per source and the token lengths of prompts and both sides.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from instune.atomic import atomic_dir, write_json
from instune.data.filters import build_checks
from instune.data.preference_formats import pair_conversations, read_pairs, validate_pair_field_map
from instune.data.preference_tokenize import tokenize_pairs
from instune.data.reference_logprobs import REFERENCE_COLUMNS, add_reference_logprobs
from instune.data.rejects import REJECT_SCHEMA, write_rejects
from instune.data.schema import make_reject
from instune.data.tokenize import IGNORE_INDEX
from instune.errors import UserError

MANIFEST = "manifest.json"
MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
PAIR_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("domain", pa.string()),
                         ("prompt", MESSAGES_TYPE), ("chosen", pa.string()), ("rejected", pa.string()),
                         ("metadata", pa.string()), ("_key", pa.string())])
TOKEN_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
LENGTH_COLUMNS = ("prompt_tokens", "chosen_tokens", "rejected_tokens", "prompt_cut", "response_cut")

_TOKENIZERS: dict = {}


def _tokenizer(path: str):
    """The tokenizer at `path`, loaded once per worker process."""
    if path not in _TOKENIZERS:
        from transformers import AutoTokenizer

        from instune.model_source import local_model_dir

        _TOKENIZERS[path] = AutoTokenizer.from_pretrained(local_model_dir(path))
    return _TOKENIZERS[path]


def pair_key(pair: dict) -> str:
    """Exact-duplicate key: the prompt's messages, the chosen and the rejected text."""
    text = json.dumps([pair["prompt"], pair["chosen"], pair["rejected"]], ensure_ascii=False)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def side_failure(pair: dict, checks: list) -> tuple[str, str] | None:
    """(stage, reason) of the first filter either side (prompt + that answer) fails, else None."""
    for side, messages in zip(("chosen", "rejected"), pair_conversations(pair)):
        for stage, check in checks:
            reason = check({"messages": messages})
            if reason:
                return stage, f"{side} side: {reason}"
    return None


def read_and_filter(task: pa.Table, *, checks: list, max_record_bytes: int, quarantine: str) -> pa.Table:
    """One file's pairs that pass normalisation and the filters; its rejects go to `quarantine`."""
    [row] = task.to_pylist()
    kept, rejects = [], []
    field_map = json.loads(row["field_map"]) if row["field_map"] else None
    for outcome, value in read_pairs(row["file"], row["source"], row["domain"], row["format"], field_map,
                                     max_record_bytes):
        if outcome == "rejected":
            rejects.append(value)
            continue
        failure = side_failure(value, checks)
        if failure:
            position = value["id"].rsplit(":", 1)[-1]
            example = value["chosen"]
            rejects.append(make_reject(row["source"], row["file"], position, *failure, example))
            continue
        kept.append({**value, "_key": pair_key(value)})
    write_rejects(rejects, quarantine)
    return pa.Table.from_pylist(kept, schema=PAIR_SCHEMA)


def in_validation(pair_id: str, seed: int, fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed + 1}:{pair_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def tokenize_batch(batch: pa.Table, *, tokenizer_path: str, max_length: int, truncation: str,
                   quarantine: str) -> pa.Table:
    """The batch's pairs with their token columns (unpadded) and lengths; pairs that cannot be fitted go to
    `quarantine` with stage "tokenize"."""
    rows = batch.to_pylist()
    results = tokenize_pairs(rows, _tokenizer(tokenizer_path), max_length, truncation)
    kept, drops = [], []
    for row, result in zip(rows, results):
        if isinstance(result, Exception):
            file, _, position = row["id"].removeprefix(f"{row['source']}:").rpartition(":")
            drops.append(make_reject(row["source"], file, position, "tokenize", str(result), row["chosen"]))
            continue
        kept.append({"id": row["id"], "source": row["source"], "domain": row["domain"],
                     "chosen_input_ids": result.chosen_input_ids.tolist(), "chosen_labels": result.chosen_labels.tolist(),
                     "rejected_input_ids": result.rejected_input_ids.tolist(),
                     "rejected_labels": result.rejected_labels.tolist(),
                     "prompt_tokens": result.prompt_tokens, "chosen_tokens": int((result.chosen_labels != IGNORE_INDEX).sum()),
                     "rejected_tokens": int((result.rejected_labels != IGNORE_INDEX).sum()),
                     "prompt_cut": result.prompt_cut, "response_cut": result.response_cut})
    write_rejects(drops, quarantine)
    table = pa.Table.from_pylist(kept, schema=TOKENIZED_SCHEMA)
    return table.append_column("_split", batch["_split"].filter(pa.array(
        [not isinstance(r, Exception) for r in results], pa.bool_())))


TOKENIZED_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("domain", pa.string())]
                             + [(c, pa.list_(pa.int64())) for c in TOKEN_COLUMNS]
                             + [("prompt_tokens", pa.int64()), ("chosen_tokens", pa.int64()),
                                ("rejected_tokens", pa.int64()), ("prompt_cut", pa.int64()),
                                ("response_cut", pa.bool_())])


def pad_rows(batch: pa.Table, *, width: int, pad_id: int) -> pa.Table:
    """Both sides' ids and labels padded on the right to `width`, so a batch of pairs is a plain tensor;
    the loop trims the columns no row of a batch uses."""
    for name in TOKEN_COLUMNS:
        fill = pad_id if name.endswith("input_ids") else IGNORE_INDEX
        values = np.full((batch.num_rows, width), fill, dtype=np.int64)
        for row, sequence in enumerate(batch[name].to_pylist()):
            values[row, :len(sequence)] = sequence
        column = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), width).cast(pa.list_(pa.int64()))
        batch = batch.set_column(batch.schema.get_field_index(name), name, column)
    return batch


def quantiles(values: np.ndarray) -> dict:
    if not len(values):
        return {}
    q = np.percentile(values, [0, 50, 90, 100])
    return {"min": int(q[0]), "median": float(q[1]), "p90": float(q[2]), "max": int(q[3]), "mean": float(values.mean())}


def reject_counts(quarantine: Path) -> dict[str, Counter]:
    """{source: Counter((stage, reason))} over every reject file."""
    import pyarrow.parquet as pq

    counts: dict[str, Counter] = {}
    for file in sorted(quarantine.glob("*.parquet")):
        for row in pq.read_table(file, schema=REJECT_SCHEMA).select(["source", "stage", "reason"]).to_pylist():
            counts.setdefault(row["source"], Counter())[(row["stage"], row["reason"])] += 1
    return counts


def prepare_pairs(config, tokenizer_path: str, data_dir: Path, model_path: str | None = None,
                  objectives: list[str] | None = None) -> dict:
    """Run the pair pipeline into `data_dir` (written whole, then renamed); return the manifest. `objectives`:
    every objective the pairs will train (a sweep's choices; default train.objective): the reference's
    log-probs are precomputed when one of them needs them."""
    import ray
    import ray.data

    from instune.data.raydata import collect, persist
    from instune.data.read import expand_paths
    from instune.config import uses_reference

    d, objective = config.data, config.train.objective
    started = time.time()
    tasks = []
    for source in d.sources:
        validate_pair_field_map(source.name, source.format, source.field_map)
        for file in expand_paths(source.name, source.path):
            tasks.append({"source": source.name, "domain": source.domain, "format": source.format, "file": file,
                          "field_map": json.dumps(source.field_map) if source.field_map else ""})
    with_reference = any(uses_reference(o) for o in (objectives or [objective]))
    precompute = with_reference and config.dpo.reference == "precompute"
    tokenizer = _tokenizer(tokenizer_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with atomic_dir(data_dir) as tmp:
        quarantine = str(tmp / "quarantine")
        checks = build_checks(d.filters)
        print(f"[prepare] pairs: reading {len(tasks)} files from {len(d.sources)} sources", flush=True)
        read = persist(ray.data.from_items(tasks, override_num_blocks=len(tasks)).map_batches(
            read_and_filter, batch_size=1, batch_format="pyarrow",
            fn_kwargs={"checks": checks, "max_record_bytes": d.max_record_bytes, "quarantine": quarantine}),
            tmp / "work" / "read")
        keys = collect(read.select_columns(["id", "_key"]))
        duplicates = set()
        if d.dedup.exact and keys is not None:
            first_of = {}
            for pair_id, key in sorted(zip(keys["id"].to_pylist(), keys["_key"].to_pylist())):
                if key in first_of:
                    duplicates.add(pair_id)
                else:
                    first_of[key] = pair_id
        near = set()
        if d.dedup.near is not None:
            near = near_duplicates(read, duplicates, d.dedup.near, str(tmp / "work" / "near"), quarantine)
        seed, fraction = d.seed, d.validation_fraction
        dropped = duplicates | near

        def dedup_and_split(batch: pa.Table) -> pa.Table:
            rows = batch.to_pylist()
            write_rejects([make_reject(r["source"], *r["id"].removeprefix(f"{r['source']}:").rsplit(":", 1),
                                       "dedup:exact", "exact duplicate of an earlier pair", r["chosen"])
                           for r in rows if r["id"] in duplicates], quarantine)
            batch = batch.filter(pa.array([r["id"] not in dropped for r in rows], pa.bool_()))
            held_out = [in_validation(i, seed, fraction) for i in batch["id"].to_pylist()]
            return batch.append_column("_split", pa.array(["validation" if h else "train" for h in held_out]))

        # One pass tokenizes and scores every pair (one actor pool), written once; the splits are then read
        # out of it.
        ds = read.map_batches(dedup_and_split, batch_format="pyarrow")
        ds = ds.map_batches(tokenize_batch, batch_format="pyarrow", fn_kwargs={
            "tokenizer_path": tokenizer_path, "max_length": config.model.max_length,
            "truncation": d.truncation, "quarantine": quarantine})
        if precompute:
            num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
            c = config.dpo
            print(f"[prepare] reference log-probs on {c.num_actors} actor(s) ({'GPU' if num_gpus else 'CPU'})",
                  flush=True)
            ds = add_reference_logprobs(ds, model_path=c.reference_model_path or model_path, pad_id=pad_id,
                                        batch_size=c.batch_size, max_batch_tokens=c.max_batch_tokens,
                                        num_actors=c.num_actors, num_gpus=num_gpus, dtype=config.model.dtype)
        ds = persist(ds.map_batches(pad_rows, batch_format="pyarrow",
                                    fn_kwargs={"width": config.model.max_length, "pad_id": pad_id}),
                     tmp / "work" / "tokenized")
        splits = {}
        for split in ("train", "validation"):
            if split == "validation" and not fraction:
                continue
            ds.filter(expr=f"_split == '{split}'").drop_columns(["_split"]).write_parquet(str(tmp / split))
            splits[split] = split_summary(local_columns(tmp / split, ["source", *LENGTH_COLUMNS]))
        train_lengths = local_columns(tmp / "train", ["prompt_tokens", "chosen_tokens", "rejected_tokens"])
        if train_lengths is not None:
            write_length_figure(tmp / "report" / "pair_token_lengths.png", train_lengths)
        sources = source_counts(d.sources, local_columns(tmp / "work" / "read", ["source"]),
                                reject_counts(Path(quarantine)))
        shutil.rmtree(tmp / "work", ignore_errors=True)
        if not splits["train"]["rows"]:
            raise UserError("data: no preference pairs left for training after reading, filtering and tokenizing; "
                            f"see {data_dir}/quarantine")
        manifest = {"config": config.model_dump(mode="json"), "kind": "preference", "objective": objective,
                    "sources": sources, "splits": splits, "seq_len": config.model.max_length,
                    "tokenizer_path": tokenizer_path,
                    "reference": "precompute" if precompute else (config.dpo.reference if with_reference
                                                                  else "none"),
                    "seconds": round(time.time() - started, 1)}
        write_json(tmp / MANIFEST, manifest)
    return manifest


def write_length_figure(path: Path, lengths: pa.Table) -> None:
    """Histograms of the training pairs' prompt, chosen and rejected token counts, for the data report (which
    shows every PNG under data/report/)."""
    from instune.report.format import figure_png, pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), sharey=True)
    for ax, name in zip(axes, ("prompt_tokens", "chosen_tokens", "rejected_tokens")):
        values = lengths[name].to_numpy()
        ax.hist(values, bins=min(40, max(5, len(set(values.tolist())))), color="#1f77b4")
        ax.set(title=f"{name.split('_')[0]} (median {np.median(values):.0f})", xlabel="tokens")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training pairs")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(figure_png(fig))  # inside prepare's atomic directory: published whole, with the rest


def local_columns(directory: Path, columns: list[str]) -> pa.Table | None:
    """`columns` of the Parquet files in a local directory, read here (small: a few numbers per pair)."""
    import pyarrow.dataset as pads

    files = sorted(str(p) for p in directory.glob("*.parquet"))
    return pads.dataset(files, format="parquet").to_table(columns=columns) if files else None


def split_summary(stats: pa.Table | None) -> dict:
    """Rows, rows per source, token-length distributions and truncation counts of a written split."""
    if stats is None:
        return {"rows": 0, "rows_by_source": {}, "lengths": {}, "prompt_shortened": 0, "response_cut": 0}
    return {"rows": stats.num_rows,
            "rows_by_source": dict(Counter(stats["source"].to_pylist())),
            "lengths": {name: quantiles(stats[name].to_numpy())
                        for name in ("prompt_tokens", "chosen_tokens", "rejected_tokens")},
            "prompt_shortened": int(np.count_nonzero(stats["prompt_cut"].to_numpy())),
            "response_cut": int(np.count_nonzero(stats["response_cut"].to_numpy(zero_copy_only=False)))}


# Stages that reject pairs already in the read-and-filtered rows (the others rejected them before).
AFTER_READ_STAGES = ("dedup:exact", "dedup:near", "tokenize")


def as_records(batch: pa.Table, *, skip: set) -> pa.Table:
    """Pairs as records whose text is the prompt and both answers, for the near-dedup of conversations."""
    rows = [r for r in batch.to_pylist() if r["id"] not in skip]
    messages = [r["prompt"] + [{"role": "assistant", "content": r["chosen"]},
                               {"role": "assistant", "content": r["rejected"]}] for r in rows]
    return pa.table({"id": [r["id"] for r in rows], "source": [r["source"] for r in rows],
                     "messages": pa.array(messages, MESSAGES_TYPE)})


def near_duplicates(read, exact: set, settings, work_dir: str, quarantine: str) -> set:
    """Ids of pairs that near-duplicate an earlier kept pair (MinHash LSH over prompt and both answers, as
    data.dedup.near does for conversations); their rejects go to `quarantine`."""
    from instune.data.dedup.minhash import near_dedup
    from instune.data.raydata import collect

    records = read.map_batches(as_records, fn_kwargs={"skip": exact}, batch_format="pyarrow")
    every = collect(records.select_columns(["id"]))
    kept, _ = near_dedup(records, settings.threshold, settings.num_perm, settings.ngram, settings.seed,
                         work_dir=work_dir, quarantine=quarantine)
    kept_ids = collect(kept.select_columns(["id"]))
    every = set(every["id"].to_pylist()) if every is not None else set()
    return every - (set(kept_ids["id"].to_pylist()) if kept_ids is not None else set())


def source_counts(sources, read_rows: pa.Table | None, rejects: dict[str, Counter]) -> dict:
    """Per source: pairs read, kept (in a split), rejected, and the reject reasons with their counts."""
    after_filters = Counter(read_rows["source"].to_pylist()) if read_rows is not None else Counter()
    out = {}
    for source in sources:
        reasons = rejects.get(source.name, Counter())
        rejected = sum(reasons.values())
        read_count = after_filters[source.name] + sum(n for (stage, _), n in reasons.items()
                                                      if stage not in AFTER_READ_STAGES)
        out[source.name] = {"read": read_count, "kept": read_count - rejected, "rejected": rejected,
                            "rejects": [{"stage": stage, "reason": reason, "count": n}
                                        for (stage, reason), n in reasons.most_common()]}
    return out
