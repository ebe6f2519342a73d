"""Every record accounted for: counts of what prepare kept, rejected, drew, packed and dropped, read back from
the files it wrote (a few small columns, with pyarrow in this process: cheaper than a Ray job), the checks that
they add up, and the one-line progress summaries."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa

from instune.data.mix import draw_batch
from instune.data.raydata import read_parquet

# Order in which records can be rejected; the report lists stages in this order.
STAGES = ("read", "normalise", "filter:length", "filter:quality", "filter:language", "filter:decontaminate",
          "dedup:exact", "dedup:near", "score")
# Image-text records (prepare_multimodal.py): "image" rejects a record whose image is missing or unusable.
MULTIMODAL_STAGES = ("read", "normalise", "image", "dedup:exact")


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


def stage_table(read_counts: dict, reject_counts: dict, stages: tuple[str, ...] = STAGES) -> dict:
    """Per source, per stage: records in, rejected, out (each stage's out is the next one's in).

    `reject_counts` maps (source, stage, reason) to a count; `stages` are the stages in order (multimodal
    prepare has its own: MULTIMODAL_STAGES).
    """
    table = {}
    for source, read in read_counts.items():
        remaining, rows = read, []
        for stage in stages:
            rejected = sum(n for (s, st, _), n in reject_counts.items() if s == source and st == stage)
            rows.append({"stage": stage, "in": remaining, "rejected": rejected, "out": remaining - rejected})
            remaining -= rejected
        table[source] = rows
    return table


def phase1_counts(read_by_source: dict[str, int], filtered_dir: Path, quarantine: Path,
                  stages: tuple[str, ...] = STAGES) -> dict:
    """{source: {read, kept, rejected, stages (stage_table), rejects (by kind of reason)}} of phase 1, from the
    read tasks' counts and the written `filtered_dir` and `quarantine`; asserts that they add up."""
    names = list(read_by_source)
    kept_counts = {n: 0 for n in names}
    for (source,), n in count_rows(filtered_dir, ["source"]).items():
        kept_counts[source] = n
    kinds = reject_kinds(quarantine)
    reject_counts = Counter()
    for k in kinds:
        reject_counts[(k["source"], k["stage"], k["reason"])] += k["count"]
    rejected_counts = {n: sum(v for (s, _, _), v in reject_counts.items() if s == n) for n in names}
    check_accounting(read_by_source, kept_counts, rejected_counts)
    table = stage_table(read_by_source, reject_counts, stages)
    by_reason: dict = {}
    for k in sorted(kinds, key=lambda k: (stages.index(k["stage"]), -k["count"], k["reason"])):
        by_reason.setdefault(k["source"], []).append({key: k[key] for key in k if key != "source"})
    return {n: {"read": read_by_source[n], "kept": kept_counts[n], "rejected": rejected_counts[n],
                "stages": table[n], "rejects": by_reason.get(n, [])} for n in names}


def phase1_line(counts: dict, files: int, seconds: float) -> str:
    """One progress line: records read, kept, rejected, and rejects per stage."""
    read, kept = sum(c["read"] for c in counts.values()), sum(c["kept"] for c in counts.values())
    per_stage = Counter()
    for c in counts.values():
        for row in c["stages"]:
            per_stage[row["stage"]] += row["rejected"]
    stages = ", ".join(f"{stage} {per_stage[stage]}" for stage in STAGES if per_stage[stage])
    return (f"[prepare] phase 1 (read, filter, dedup, score): {read} records from {files} files -> kept {kept}, "
            f"rejected {read - kept}{f' ({stages})' if stages else ''} in {seconds:.1f} s "
            f"({read / max(seconds, 1e-9):.0f} records/s)")


def most_common_rejects(counts: dict, limit: int = 3) -> str:
    kinds = Counter()
    for c in counts.values():
        for r in c["rejects"]:
            kinds[(r["stage"], r["reason"])] += r["count"]
    return "; ".join(f"{stage}: {reason} ({n})" for (stage, reason), n in kinds.most_common(limit)) or "none"


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


def phase2_line(splits: dict, seq_len: int, seconds: float) -> str:
    parts = []
    for name, s in splits.items():
        drawn = sum(s["drawn"].values())
        expanded = sum(k["extra_examples"] for kinds in s.get("adjusted", {}).values() for k in kinds)
        parts.append(f"{name} {drawn} drawn -> {s['examples']} examples in {s['rows']} rows of {seq_len} tokens "
                     f"({s['packing_efficiency']:.0%} full), {s['dropped_total']} dropped at tokenization"
                     + (f", {expanded} examples from expanded conversations" if expanded else ""))
    examples = sum(s["examples"] for s in splits.values())
    return (f"[prepare] phase 2 (mix, tokenize, pack): {'; '.join(parts)} in {seconds:.1f} s "
            f"({examples / max(seconds, 1e-9):.0f} examples/s)")


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


def tokenization_drops_by_source(drops_dir: Path, split_names) -> dict[str, int]:
    """{source: distinct records dropped at tokenization in any split}: a record drawn twice counts once."""
    dropped: set[tuple[str, str]] = set()
    for name in split_names:
        table = read_columns(Path(drops_dir) / name, ["source", "id"])
        if table is not None:
            dropped.update(zip(table["source"].to_pylist(), table["id"].to_pylist()))
    return dict(Counter(source for source, _ in dropped))


def source_table(sources: dict[str, dict]) -> tuple[list[str], list[list]]:
    """(columns, rows) of the per-source table: a record dropped at tokenization (it cannot be trained on, e.g.
    no answer fits max_length) counts as rejected, not kept. The manifest keeps phase 1's `kept` (the rows of
    filtered/, which phase 2 draws from) and the drops beside it as `dropped_at_tokenization`."""
    rows = []
    for name, c in sources.items():
        dropped = c.get("dropped_at_tokenization", 0)
        kept, rejected = c["kept"] - dropped, c["rejected"] + dropped
        rows.append([name, c["read"], kept, rejected, dropped,
                     round(100 * kept / c["read"], 1) if c["read"] else None])
    return ["source", "read", "kept", "rejected", "of which at tokenization", "kept %"], rows
