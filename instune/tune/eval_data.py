"""Eval sets as training-loop rows, so every trial reports its loss on each set while it trains.

Tokenized once per sweep with the packer's row layout (one example per row, padded), written as one
Parquet file per set; each trial hands them to Ray Train as extra datasets (`eval_datasets`).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from instune.atomic import atomic_dir
from instune.errors import UserError

# Dataset names the training loop already uses; an eval set may not take them.
RESERVED_NAMES = ("train", "validation")


def tokenize_eval_sets(eval_sets: list, tokenizer_path: str, seq_len: int, out_dir: Path) -> dict[str, str]:
    """Write `<out_dir>/<set>.parquet` for each EvalSet (the directory replaced whole); returns set name -> file."""
    from transformers import AutoTokenizer

    from instune.data.pack import pad_one
    from instune.data.tokenize import Tokenized, tokenize_batch

    from instune.model_source import local_model_dir

    tokenizer = AutoTokenizer.from_pretrained(local_model_dir(tokenizer_path))
    tables = {}
    for s in eval_sets:
        if s.name in RESERVED_NAMES:
            raise UserError(f"eval.sets[{s.name}]: the name {s.name!r} is taken by the training data; rename the set")
        tokenized = tokenize_batch([r["messages"] for r in s.records], tokenizer, seq_len, "truncate")
        rows = [pad_one(t.input_ids, t.labels, seq_len, tokenizer.pad_token_id)
                for t in tokenized if isinstance(t, Tokenized)]
        if not rows:
            raise UserError(f"eval.sets[{s.name}]: no example could be tokenized for eval loss")
        tables[s.name] = pa.table({k: [r[k] for r in rows] for k in ("input_ids", "labels", "position_ids")})
    with atomic_dir(out_dir) as tmp:
        for name, table in tables.items():
            pq.write_table(table, tmp / f"{name}.parquet")
    return {name: str((out_dir / f"{name}.parquet").resolve()) for name in tables}
