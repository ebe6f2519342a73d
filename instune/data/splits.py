"""Phase 2 of prepare: a mixture drawn from the filtered records (mix.py), outcome markers added, tokenized and
packed into the train and validation splits, as lazy Ray Datasets. `instune prepare` writes them
(`write_splits`), training with `data.stream` consumes them as they come (`stream_train_data`), and each sweep
trial redraws its own mixture (`mix_tokenize_pack`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from instune.data.accounting import adjusted_counts, drawn_counts, dropped_counts, packed_stats
from instune.data.manifest import load_manifest
from instune.data.mix import draw_batch, mixture_copies
from instune.data.outcome import OutcomeMarkers
from instune.data.raydata import cluster_cpus, read_parquet, task_shuffle
from instune.data.tokenize import TokenizerParts

if TYPE_CHECKING:
    from instune.config import ExperimentConfig


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
                      batch_size: int = TOKENIZE_BATCH_ROWS, tokenizer_parts: TokenizerParts | None = None,
                      shuffle: str = "global", shuffle_window: int = 20_000):
    """Phase 2, lazily: (train dataset, validation dataset or None, copies per source).

    `size` is the size of the train mixture: with a validation split, copies are worked out over the records
    outside it (one pass over the ids). With `drops_dir`, records dropped at tokenization are written under
    `drops_dir/<split>/`, and records the chat template adjusted under `adjusted_dir/<split>/`. `concurrency`
    caps the tokenize tasks running at once; None runs one per CPU.
    `tokenizer_parts` (of the tokenizer at `tokenizer_path`) is loaded here when not given. `shuffle` and
    `shuffle_window` choose how the train mixture is shuffled (shuffle.py).
    """
    import ray
    from ray.data.datasource import FileShuffleConfig

    from instune.data.shuffle import shuffled

    if validation_fraction:
        held_in = drawn_counts(filtered_dir, "train", dict.fromkeys(kept, 1.0), seed, validation_fraction)
        kept = {s: held_in.get(s, 0) for s in kept}
    copies = mixture_copies(kept, weights, size)
    # A windowed shuffle also reads the files in a seeded random order, so its windows mix sources.
    file_order = FileShuffleConfig(seed=seed) if shuffle == "windowed" else None
    records = task_shuffle(read_parquet(str(filtered_dir), override_num_blocks=shuffle_blocks(filtered_dir),
                                        shuffle=file_order))
    tasks = concurrency or cluster_cpus()
    if tokenizer_parts is None:
        tokenizer_parts = ray.get(start_loading_tokenizer_parts(tokenizer_path))

    def split(name: str):
        drawn = records.map_batches(draw_batch, batch_format="pyarrow", fn_kwargs={
            "split": name, "copies_by_source": copies, "seed": seed, "validation_fraction": validation_fraction})
        if name == "train":  # so bins mix sources and training sees them interleaved
            drawn = shuffled(drawn, shuffle, seed, shuffle_window)
        return drawn.map_batches(
            tokenize_and_pack, batch_size=batch_size, concurrency=concurrency, batch_format="pyarrow",
            fn_kwargs={"tokenizer_path": tokenizer_path, "seq_len": seq_len, "truncation": truncation,
                       "pack": pack, "outcome_markers": outcome_markers,
                       "drops_dir": str(drops_dir / name) if drops_dir else None, "serial_tokenizer": tasks > 1,
                       "tokenizer_parts": tokenizer_parts, "join_turns": join_turns,
                       "adjusted_dir": str(adjusted_dir / name) if adjusted_dir else None})

    return split("train"), split("validation") if validation_fraction else None, copies


def phase2_arguments(config: ExperimentConfig, tokenizer_path: str) -> dict:
    """Keyword arguments of `mix_tokenize_pack` (but the directory and kept counts) from the config."""
    d = config.data
    markers = OutcomeMarkers(**d.outcome_markers.model_dump()) if d.outcome_markers is not None else None
    return {"weights": {s.name: s.weight for s in d.sources}, "size": d.mix_size, "seed": d.seed,
            "tokenizer_path": tokenizer_path, "seq_len": config.model.max_length, "truncation": d.truncation,
            "pack": d.pack, "validation_fraction": d.validation_fraction, "outcome_markers": markers,
            "join_turns": d.join_consecutive_turns, "shuffle": d.shuffle, "shuffle_window": d.shuffle_window}


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


def stream_train_data(config: ExperimentConfig, tokenizer_path: str, data_dir: Path):
    """(train dataset, validation dataset or None): phase 2 over `data_dir/filtered`, lazily, for training to
    consume as it runs; nothing is written. The mixture, markers and packing come from `config`."""
    manifest = load_manifest(data_dir)
    kept = {s: c["kept"] for s, c in manifest["sources"].items()}
    train, validation, _ = mix_tokenize_pack(Path(data_dir) / "filtered", kept,
                                             **phase2_arguments(config, tokenizer_path))
    return train, validation
