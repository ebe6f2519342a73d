"""Pack tokenized examples into fixed-length rows (best-fit bin packing, not concatenate-and-chop).

Each output row has `input_ids`, `labels` and `position_ids` of exactly `seq_len` tokens. Position ids restart
at 0 for every example; transformers turns restarting position ids (with no attention mask) into a
block-diagonal causal mask, so attention never crosses examples and a packed batch has the same loss as the
same examples unpacked. Padding forms its own segment, with labels ignored.

Bins hold references to their examples (lists or int arrays) and are laid out only when closed: as dict rows
(`finish`), or all at once as an Arrow table (`rows_table`, the data stage's path, which never turns a token
into a Python int).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from instune.data.tokenize import IGNORE_INDEX

# Token ids, labels and positions are int32 (every vocabulary and context length fits): half the bytes to
# write, to hold in the object store and to read back every epoch. Training widens them to int64 tensors.
PACKED_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())), ("position_ids", pa.list_(pa.int32())),
    ("num_examples", pa.int64()), ("num_target_tokens", pa.int64()), ("num_tokens", pa.int64()),
    ("sources", pa.list_(pa.string())),
])


@dataclass(eq=False)  # bins are compared by identity (list.remove), never by their examples
class Bin:
    examples: list[tuple] = field(default_factory=list)  # (input_ids, labels) in order
    length: int = 0
    target_tokens: int = 0
    # The source of each example, in order: the data report counts the realised mixture from these.
    sources: list[str] = field(default_factory=list)

    def add(self, input_ids, labels, source: str = "") -> None:
        self.examples.append((input_ids, labels))
        self.length += len(input_ids)
        self.target_tokens += int(np.count_nonzero(np.asarray(labels) != IGNORE_INDEX))
        self.sources.append(source)


def finish(bin_: Bin, seq_len: int, pad_id: int) -> dict:
    """One bin as a row of Python lists."""
    pad = seq_len - bin_.length
    assert pad >= 0, "a bin overflowed its sequence length"
    input_ids, labels, position_ids = [], [], []
    for ids, example_labels in bin_.examples:
        input_ids += list(map(int, ids))
        labels += list(map(int, example_labels))
        position_ids += range(len(ids))
    return {
        "input_ids": input_ids + [pad_id] * pad,
        "labels": labels + [IGNORE_INDEX] * pad,
        "position_ids": position_ids + list(range(pad)),
        "num_examples": len(bin_.examples),
        "num_target_tokens": bin_.target_tokens,
        "num_tokens": bin_.length,  # before padding: packing efficiency is num_tokens / seq_len
        "sources": bin_.sources,
    }


def rows_table(bins: list[Bin], seq_len: int, pad_id: int) -> pa.Table:
    """Every bin as one row of PACKED_SCHEMA, built from concatenated arrays."""
    ids, labels, positions = [], [], []
    for b in bins:
        pad = seq_len - b.length
        assert pad >= 0, "a bin overflowed its sequence length"
        for example_ids, example_labels in b.examples:
            ids.append(np.asarray(example_ids, dtype=np.int32))
            labels.append(np.asarray(example_labels, dtype=np.int32))
            positions.append(np.arange(len(example_ids), dtype=np.int32))
        if pad:
            ids.append(np.full(pad, pad_id, dtype=np.int32))
            labels.append(np.full(pad, IGNORE_INDEX, dtype=np.int32))
            positions.append(np.arange(pad, dtype=np.int32))
    offsets = pa.array(np.arange(len(bins) + 1, dtype=np.int32) * seq_len)

    def column(parts: list[np.ndarray]) -> pa.Array:
        values = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        return pa.ListArray.from_arrays(offsets, pa.array(values, pa.int32()))

    return pa.Table.from_arrays([
        column(ids), column(labels), column(positions),
        pa.array([len(b.examples) for b in bins], pa.int64()),
        pa.array([b.target_tokens for b in bins], pa.int64()),
        pa.array([b.length for b in bins], pa.int64()),
        pa.array([b.sources for b in bins], pa.list_(pa.string())),
    ], schema=PACKED_SCHEMA)


class Packer:
    """Streaming best-fit packer: keeps up to `max_open` bins open and closes the fullest when over."""

    def __init__(self, seq_len: int, pad_id: int, max_open: int = 64):
        self.seq_len, self.pad_id, self.max_open = seq_len, pad_id, max_open
        self.open: list[Bin] = []

    def place(self, input_ids, labels, source: str = "") -> list[Bin]:
        """Place one example; return the bins this closed."""
        size = len(input_ids)
        assert size <= self.seq_len, "examples must be truncated to seq_len before packing"
        best, best_room = None, self.seq_len + 1
        for b in self.open:
            room = self.seq_len - b.length - size
            if 0 <= room < best_room:
                best, best_room = b, room
        if best is None:
            best = Bin()
            self.open.append(best)
        best.add(input_ids, labels, source)
        closed = []
        if best.length == self.seq_len:
            self.open.remove(best)
            closed.append(best)
        if len(self.open) > self.max_open:
            fullest = max(self.open, key=lambda b: b.length)
            self.open.remove(fullest)
            closed.append(fullest)
        return closed

    def close_all(self) -> list[Bin]:
        bins, self.open = self.open, []
        return bins

    def add(self, input_ids, labels, source: str = "") -> list[dict]:
        """Place one example; return the rows of any bins this closed."""
        return [finish(b, self.seq_len, self.pad_id) for b in self.place(input_ids, labels, source)]

    def flush(self) -> list[dict]:
        return [finish(b, self.seq_len, self.pad_id) for b in self.close_all()]


def pack_bins(examples, seq_len: int, pad_id: int, max_open: int = 64) -> list[Bin]:
    """Pack an iterable of (input_ids, labels) or (input_ids, labels, source) tuples; returns every bin."""
    packer = Packer(seq_len, pad_id, max_open)
    bins = []
    for example in examples:
        bins += packer.place(*example)
    return bins + packer.close_all()


def pack(examples, seq_len: int, pad_id: int, max_open: int = 64) -> list[dict]:
    """`pack_bins` as dict rows."""
    return [finish(b, seq_len, pad_id) for b in pack_bins(examples, seq_len, pad_id, max_open)]


def single_bins(examples) -> list[Bin]:
    """One example per bin (packing off)."""
    bins = []
    for example in examples:
        b = Bin()
        b.add(*example)
        bins.append(b)
    return bins


def pad_one(input_ids: list[int], labels: list[int], seq_len: int, pad_id: int, source: str = "") -> dict:
    """One example per row (packing off), in the same row layout as packed rows."""
    [b] = single_bins([(input_ids, labels, source)])
    return finish(b, seq_len, pad_id)
