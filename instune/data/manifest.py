"""The manifest of a prepared data directory: its config, counts, mixture, splits and file digests, written
last, so a directory (or bucket prefix) without it is unfinished."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from instune.errors import UserError


MANIFEST = "manifest.json"


def build_manifest(config_tree: dict, sources: dict, mixture: dict, splits: dict, *, streamed: bool,
                   seq_len: int, tokenizer_path: str) -> dict:
    """The manifest of a prepare run, but for what is measured once its files are written (outcomes, files,
    seconds, report): the config, the per-source accounting of phase 1, the mixture, the split statistics."""
    return {"config": config_tree, "sources": sources, "mixture": mixture, "splits": splits, "streamed": streamed,
            "seq_len": seq_len, "tokenizer_path": tokenizer_path}


def file_digests(directory: Path) -> dict[str, str]:
    """{path relative to `directory`: SHA-256} of every Parquet file under it."""
    return {str(p.relative_to(directory)): file_digest(p) for p in sorted(directory.rglob("*.parquet"))}


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(data_dir: str | Path) -> dict:
    """The manifest of the prepared data in `data_dir`, a local path or a URI (instune.storage)."""
    from instune import storage

    path = storage.join(data_dir, MANIFEST)
    if not storage.is_file(path):
        raise UserError(f"{data_dir}: no {MANIFEST}, so this is not a complete prepared dataset "
                        "(run `instune prepare` first)")
    return json.loads(storage.read_text(path))
