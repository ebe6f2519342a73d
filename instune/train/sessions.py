"""Where a worker's batches come from and where its reports go: Ray Train, or torchrun without Ray."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch

from instune.train.multimodal_batches import MULTIMODAL_COLUMNS, collate_multimodal

COLUMNS = ("input_ids", "labels", "position_ids")
# A preference pair's row: both sides' ids and labels, and the reference's log-probs when prepare computed them.
PAIR_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def columns_of(names) -> tuple[str, ...]:
    """The columns a batch of rows with these column names trains from: packed SFT rows, preference pairs or
    image-text rows (multimodal_batches.py)."""
    names = set(names)
    if "pixel_values" in names:
        return MULTIMODAL_COLUMNS
    if not set(PAIR_COLUMNS) <= names:
        return COLUMNS
    return PAIR_COLUMNS + tuple(c for c in REFERENCE_COLUMNS if c in names)
# A worker writes its part of a checkpoint into a temporary directory named so, in its session's scratch_dir.
CHECKPOINT_SCRATCH_PREFIX = "instune-ckpt-"


def to_tensors(batch: dict) -> dict:
    if "pixel_values" in batch:
        return collate_multimodal(batch)
    # Token columns are integers; the reference log-probs stay floating point.
    return {k: torch.as_tensor(np.stack(batch[k]) if batch[k].dtype == object else batch[k],
                               dtype=torch.float32 if k in REFERENCE_COLUMNS else torch.long)
            for k in columns_of(batch)}


def common_length(lists) -> int | None:
    """The length every list of an Arrow list array has, or None when they differ (or there are none)."""
    lengths = pc.list_value_length(lists)
    shortest, longest = pc.min_max(lengths).values()
    return shortest.as_py() if len(lists) and shortest.as_py() == longest.as_py() else None


def rows_tensor(column) -> torch.Tensor:
    """A list<int> column as a (rows, length) tensor. Packed and padded rows all have one length, so the
    values reshape straight from Arrow's buffer; Python lists would cost ~9 ms per 8 x 2048 batch."""
    values = column.combine_chunks()
    length = common_length(values)
    if length is None:
        return torch.tensor(values.to_pylist(), dtype=torch.long)  # ragged rows: torch reports the mismatch
    return torch.tensor(values.flatten().to_numpy().reshape(len(values), length), dtype=torch.long)


class RaySession:
    """Inside a Ray Train worker: streaming dataset shards, ray.train.report and get_checkpoint."""

    # Ray Train copies a reported checkpoint into its storage, from wherever it is: the system temp directory.
    scratch_dir = None

    def __init__(self):
        import ray.train

        self._train = ray.train
        context = ray.train.get_context()
        self.world_rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.local_rank = context.get_local_rank()
        self._shards = {}

    def _shard(self, name: str):
        if name not in self._shards:
            try:
                self._shards[name] = self._train.get_dataset_shard(name)
            except (KeyError, ValueError):
                self._shards[name] = None
        return self._shards[name]

    def has(self, name: str) -> bool:
        return self._shard(name) is not None

    def batches(self, name: str, batch_size: int, epoch: int):
        for batch in self._shard(name).iter_batches(batch_size=batch_size, batch_format="numpy",
                                                    drop_last=(name == "train")):
            yield to_tensors(batch)

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        # Every rank passes its part of the checkpoint; Ray Train merges them into one directory in storage
        # and registers it only once all parts are persisted.
        checkpoint = self._train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        self._train.report(metrics, checkpoint=checkpoint)

    @contextlib.contextmanager
    def latest_checkpoint(self):
        checkpoint = self._train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield directory


class FileSession:
    """Under torchrun (or a single plain process): Parquet files split by rank, metrics as JSON lines.

    Checkpoints go to `output_dir/checkpoints/step-N`: every rank writes its part in a temporary directory
    beside them (`scratch_dir`, the same filesystem) and moves its files into `step-N.partial`, then rank 0
    renames that, so a directory named `step-N` is always complete. Moving, not copying, writes each byte of a
    checkpoint once (a full 1.1B model's is 15 GB). The newest `keep` are kept.
    """

    def __init__(self, datasets: dict[str, list[str]], output_dir: str, seed: int = 0, keep: int = 2):
        import torch.distributed as dist

        self.world_rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.datasets, self.output_dir, self.seed, self.keep = datasets, Path(output_dir), seed, keep
        self.scratch_dir = self.output_dir / "checkpoints"
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        if self.world_rank == 0:
            # Parts left by a worker that died while writing them. No rank writes a new part before the
            # first training step, which waits for rank 0.
            for stale in self.scratch_dir.glob(CHECKPOINT_SCRATCH_PREFIX + "*"):
                shutil.rmtree(stale, ignore_errors=True)

    def has(self, name: str) -> bool:
        return bool(self.datasets.get(name))

    def batches(self, name: str, batch_size: int, epoch: int):
        import pyarrow.parquet as pq

        columns = columns_of(pq.read_schema(self.datasets[name][0]).names)
        table = pq.read_table(self.datasets[name], columns=list(columns))
        rows = np.arange(table.num_rows)
        if name == "train":
            np.random.default_rng(self.seed + epoch).shuffle(rows)
        # Equal rows per rank, so every rank runs the same number of steps (collectives must match).
        per_rank = len(rows) // self.world_size
        mine = rows[self.world_rank * per_rank:(self.world_rank + 1) * per_rank]
        full = len(mine) // batch_size * batch_size if name == "train" else len(mine)
        for start in range(0, full, batch_size):
            chunk = table.take(mine[start:start + batch_size])
            if "pixel_values" in columns:
                # Each row's lists as numpy arrays, as Ray Data's batches hold them: to_pylist made a Python
                # number of every pixel (13.7 ms a 336-pixel image).
                yield collate_multimodal({k: chunk[k].to_numpy(zero_copy_only=False) for k in columns})
                continue
            yield {k: torch.tensor(chunk[k].to_numpy(), dtype=torch.float32) if k in REFERENCE_COLUMNS
                   else rows_tensor(chunk[k]) for k in columns}

    def _barrier(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        if self.world_rank == 0:
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
        if checkpoint_dir is None:
            return
        final = self.output_dir / "checkpoints" / f"step-{metrics['step']:08d}"
        partial = final.with_name(final.name + ".partial")
        if self.world_rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        self._barrier()
        for part in sorted(Path(checkpoint_dir).rglob("*")):
            if part.is_file():
                target = partial / part.relative_to(checkpoint_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(part, target)
        self._barrier()
        if self.world_rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            for old in self._done()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()

    def _done(self) -> list[Path]:
        return sorted((self.output_dir / "checkpoints").glob("step-[0-9]*[0-9]"))

    @contextlib.contextmanager
    def latest_checkpoint(self):
        done = self._done()
        yield done[-1] if done else None
