"""`instune prepare`: raw corpora -> filtered per-source records -> mixed, tokenized, packed shards.

Two phases, both streaming Ray Datasets with disk in between:
  1. read + normalise (+ filters, dedup): every input record ends as one row, kept or rejected with a reason.
     Kept rows go to `filtered/`, rejects to `quarantine/`. This is the expensive part and runs once.
     With `data.score` set, a reference model scores what survives dedup and selects by score (stage "score").
     Reading is sources.py; this module runs the filters, dedup and scoring over what it yields.
  2. mix + tokenize + pack (splits.py): draws a mixture from `filtered/` by source weights (mix.py), adds
     outcome markers, and tokenizes and packs. Sweeps call this alone to redraw a mixture for each trial
     without reading or filtering again; with `data.stream` training consumes it directly
     (`splits.stream_train_data`) and nothing is written.

Every record is accounted for (accounting.py): read == kept + rejected per source and per stage in phase 1,
and in phase 2 every record drawn into a split is packed or dropped at tokenization (with its reason). The
manifest (manifest.py) holds these counts, the requested and realised mixture, and `report/` a readable
report with figures (data_report.py).

Layout: filtered/ and quarantine/ (phase 1), train/ and validation/ (packed rows), dropped/<split>/ (records
dropped at tokenization, with reasons), adjusted/<split>/ (records the chat template needed an adjustment for,
chat_template.py), report/ (report.md and figures), manifest.json; written whole or not at all (atomic_dir).

Every stage of phase 1 writes its rejects straight to `quarantine/` from the task that finds them
(instune.data.rejects) and passes only its kept records on, so reading and filtering are one streaming pass.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from instune.atomic import atomic_dir, write_json
from instune.data.accounting import (most_common_rejects, outcome_counts, phase1_counts, phase1_line, phase2_line,
                                     tokenization_drops_by_source)
from instune.data.filters import build_checks
from instune.data.manifest import MANIFEST, build_manifest, file_digests
from instune.data.mix import mixture_copies, mixture_summary
from instune.data.pre_experience import PreExperience
from instune.data.sources import SourceFiles, plan_sources, read_all, read_counts
from instune.data.splits import phase2_arguments, start_loading_tokenizer_parts, write_splits
from instune.errors import UserError

if TYPE_CHECKING:
    from instune.config import DataConfig, ExperimentConfig, FilterConfig, ScoreConfig


def prepare(config: ExperimentConfig, tokenizer_path: str, data_dir: Path, eval_texts: list[str] = (),
            model_path: str | None = None) -> dict:
    """Run both phases into `data_dir` (written whole with its report, then renamed); return the manifest.

    `model_path` (the run's base model) is the default reference model of `data.score`. With `data.stream`
    phase 2 is left to training (`stream_train_data`), and only `filtered/`, `quarantine/` and the manifest
    are written.
    """
    import ray

    from instune.data.data_report import write_data_report

    d = config.data
    sources = plan_sources(d.sources)
    scoring = score_arguments(d.score, model_path, tokenizer_path, config.model.max_length, d.truncation) \
        if d.score else None
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
                                f"({'; '.join(sorted(reasons))}); raise model.max_length")
            # The per-source table counts a record that cannot be trained on as rejected (accounting.source_table).
            for source, dropped in tokenization_drops_by_source(tmp / "dropped", splits).items():
                counts[source]["dropped_at_tokenization"] = dropped
        manifest = build_manifest(config.model_dump(mode="json"), counts, mixture_summary(kept, mix, copies, splits),
                                  splits, streamed=d.stream, seq_len=config.model.max_length,
                                  tokenizer_path=tokenizer_path)
        if d.outcome_markers is not None:
            manifest["outcomes"] = outcome_counts(tmp / "filtered", d.outcome_markers.field)
        manifest["files"] = file_digests(tmp)
        manifest["seconds"] = round(time.time() - started, 1)
        report = write_data_report(tmp, manifest, detect_languages=d.filters.language is not None, seed=d.seed)
        manifest["report"] = str(report.relative_to(tmp))
        write_json(tmp / MANIFEST, manifest)
    print(f"[prepare] wrote {data_dir} (report: {data_dir / manifest['report']}) in {manifest['seconds']:.1f} s",
          flush=True)
    return manifest


def filter_and_split(sources: list[SourceFiles], data_config: DataConfig, out_dir: Path, checks: list,
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

    counts = phase1_counts(read_counts(work / "read", sources), out_dir / "filtered", out_dir / "quarantine")
    shutil.rmtree(work, ignore_errors=True)
    # The driver grouped keys and verified candidate pairs; give what that took back before phase 2, or its
    # memory grows with the corpus for the rest of the run (Arrow's allocator keeps freed pages for reuse).
    gc.collect()
    pa.default_memory_pool().release_unused()
    return counts


def token_counter(tokenizer_path: str, filters: FilterConfig):
    """A token-counting function for the length filter, only when a token bound is set."""
    length = filters.length
    if length is None or all(getattr(length, f) is None for f in
                             ("min_turn_tokens", "max_turn_tokens", "min_tokens", "max_tokens")):
        return None
    from transformers import AutoTokenizer

    from instune.model_source import model_files

    tokenizer = AutoTokenizer.from_pretrained(model_files(tokenizer_path).directory)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def score_arguments(score: ScoreConfig, model_path: str | None, tokenizer_path: str, max_length: int,
                    truncation: str) -> dict:
    """Keyword arguments of `score.score_dataset` from `data.score`; the model defaults to the run's base model."""
    if score.model_path:
        from instune.base_model import check_model_source
        from instune.model_source import model_files

        # A Hub id or bucket URI goes to the scoring actors as it is: each node fetches it (model_source.py).
        path = tokenizer = check_model_source(score.model_path, "data.score.model_path")
        if not {"tokenizer.json", "tokenizer_config.json"} & set(model_files(path).names):
            raise UserError(f"data.score.model_path: {score.model_path} has no tokenizer files "
                            "(tokenizer.json or tokenizer_config.json)")
    elif model_path:
        path, tokenizer = model_path, tokenizer_path
    else:
        raise UserError("data.score.model_path: not set, and no base model was given to score with")
    return {"model_path": path, "tokenizer_path": tokenizer, "metric": score.metric, "max_length": max_length,
            "batch_size": score.batch_size, "max_batch_tokens": score.max_batch_tokens,
            "num_actors": score.num_actors, "min_score": score.min_score,
            "max_score": score.max_score, "top_fraction": score.top_fraction, "keep": score.keep,
            "truncation": truncation,
            "pre_experience": PreExperience(**score.pre_experience.model_dump())
            if score.reference == "pre_experienced" else None}
