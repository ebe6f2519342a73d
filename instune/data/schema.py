"""The canonical record every reader produces, and the reject record every stage emits.

A canonical record (one row of a Ray Dataset, or a plain dict):
    id        str   stable across runs: "<source>:<file basename>:<record index>"
    source    str   the source's name from the config
    domain    str   the source's domain tag (used for mixing and in/out-of-domain eval)
    messages  list[{"role": str, "content": str}]   roles: system, user, assistant
    metadata  str   JSON object as text (kept as a string so every block has one Arrow schema)

A reject (one row of the quarantine dataset):
    source    str   the source's name
    file      str   the file it came from
    record    str   record index, line number or byte offset, as text ("line 17", "offset 5120", "index 3")
    stage     str   the pipeline stage that rejected it ("read", "normalise", "filter:length", "dedup:exact", ...)
    reason    str   one line saying what is wrong
    example   str   the start of the raw record (at most 200 characters), for the report
"""

from __future__ import annotations

import json

ROLES = ("system", "user", "assistant")
EXAMPLE_CHARS = 200

RECORD_COLUMNS = ("id", "source", "domain", "messages", "metadata")
REJECT_COLUMNS = ("source", "file", "record", "stage", "reason", "example")


def make_record(id: str, source: str, domain: str, messages: list[dict], metadata: dict | None = None) -> dict:
    return {
        "id": id,
        "source": source,
        "domain": domain,
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "metadata": json.dumps(metadata or {}, sort_keys=True),
    }


def make_reject(source: str, file: str, record: str, stage: str, reason: str, raw: str | bytes = "") -> dict:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    return {
        "source": source,
        "file": file,
        "record": record,
        "stage": stage,
        "reason": reason,
        "example": raw[:EXAMPLE_CHARS],
    }


def record_text(record: dict) -> str:
    """All message contents joined, for filters and dedup that look at the whole conversation."""
    return "\n".join(m["content"] for m in record["messages"])
