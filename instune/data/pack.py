"""Pack tokenized examples into fixed-length rows (best-fit bin packing, not concatenate-and-chop).

Each output row has `input_ids`, `labels` and `position_ids` of exactly `seq_len` tokens. Position ids restart
at 0 for every example; transformers turns restarting position ids (with no attention mask) into a
block-diagonal causal mask, so attention never crosses examples and a packed batch has the same loss as the
same examples unpacked. Padding forms its own segment, with labels ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from instune.data.tokenize import IGNORE_INDEX


@dataclass
class Bin:
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    num_examples: int = 0
    # The source of each example, in order: the data report counts the realised mixture from these.
    sources: list[str] = field(default_factory=list)

    def add(self, input_ids: list[int], labels: list[int], source: str = "") -> None:
        self.input_ids += input_ids
        self.labels += labels
        self.position_ids += range(len(input_ids))
        self.num_examples += 1
        self.sources.append(source)


def finish(bin_: Bin, seq_len: int, pad_id: int) -> dict:
    pad = seq_len - len(bin_.input_ids)
    assert pad >= 0, "a bin overflowed its sequence length"
    return {
        "input_ids": bin_.input_ids + [pad_id] * pad,
        "labels": bin_.labels + [IGNORE_INDEX] * pad,
        "position_ids": bin_.position_ids + list(range(pad)),
        "num_examples": bin_.num_examples,
        "num_target_tokens": sum(label != IGNORE_INDEX for label in bin_.labels),
        "num_tokens": len(bin_.input_ids),  # before padding: packing efficiency is num_tokens / seq_len
        "sources": bin_.sources,
    }


class Packer:
    """Streaming best-fit packer: keeps up to `max_open` bins open and closes the fullest when over."""

    def __init__(self, seq_len: int, pad_id: int, max_open: int = 64):
        self.seq_len, self.pad_id, self.max_open = seq_len, pad_id, max_open
        self.open: list[Bin] = []

    def add(self, input_ids: list[int], labels: list[int], source: str = "") -> list[dict]:
        """Place one example; return the rows of any bins this closed."""
        assert len(input_ids) <= self.seq_len, "examples must be truncated to seq_len before packing"
        best, best_room = None, self.seq_len + 1
        for b in self.open:
            room = self.seq_len - len(b.input_ids) - len(input_ids)
            if 0 <= room < best_room:
                best, best_room = b, room
        if best is None:
            best = Bin()
            self.open.append(best)
        best.add(input_ids, labels, source)
        closed = []
        if len(best.input_ids) == self.seq_len:
            self.open.remove(best)
            closed.append(finish(best, self.seq_len, self.pad_id))
        if len(self.open) > self.max_open:
            fullest = max(self.open, key=lambda b: len(b.input_ids))
            self.open.remove(fullest)
            closed.append(finish(fullest, self.seq_len, self.pad_id))
        return closed

    def flush(self) -> list[dict]:
        rows = [finish(b, self.seq_len, self.pad_id) for b in self.open]
        self.open = []
        return rows


def pack(examples, seq_len: int, pad_id: int, max_open: int = 64) -> list[dict]:
    """Pack an iterable of (input_ids, labels) or (input_ids, labels, source) tuples; returns every row."""
    packer = Packer(seq_len, pad_id, max_open)
    rows = []
    for example in examples:
        rows += packer.add(*example)
    return rows + packer.flush()


def pad_one(input_ids: list[int], labels: list[int], seq_len: int, pad_id: int, source: str = "") -> dict:
    """One example per row (packing off), in the same row layout as packed rows."""
    b = Bin()
    b.add(input_ids, labels, source)
    return finish(b, seq_len, pad_id)
