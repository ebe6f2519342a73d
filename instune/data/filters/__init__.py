"""Record filters. Each `check_xxx(record, ...)` returns a one-line reject reason, or None to keep the record.

`build_checks` turns the `data.filters` config block into (stage, check) pairs; `split_records` applies
them to a list and `filter_dataset` to a Ray Dataset. Rejects follow `schema.make_reject`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable, Iterable

import pyarrow as pa
import pyarrow.compute as pc

from instune.data.filters.decontaminate import build_ngram_index, check_contamination
from instune.data.filters.language import check_language
from instune.data.filters.length import check_length
from instune.data.filters.quality import check_quality
from instune.data.rejects import REJECT_SCHEMA, write_rejects
from instune.data.schema import make_reject, record_text

if TYPE_CHECKING:
    import ray.data

    from instune.config import FilterConfig

Check = tuple[str, Callable[[dict], "str | None"]]

# Columns a marking pass adds before kept records and rejects are split apart.
STAGE_COLUMN = "_reject_stage"
REASON_COLUMN = "_reject_reason"


def record_location(record: dict) -> tuple[str, str]:
    """(file, record) for a reject, from an id "<source>:<file>:<position>" (a bare number N -> "index N")."""
    rest = record["id"].removeprefix(f"{record['source']}:")
    file, _, position = rest.rpartition(":")
    if not file:
        return rest, ""
    return file, f"index {position}" if position.isdigit() else position


def reject_for_record(record: dict, stage: str, reason: str) -> dict:
    """A reject row for a canonical record; the example is the start of its text."""
    file, position = record_location(record)
    return make_reject(record["source"], file, position, stage, reason, record_text(record))


def build_checks(
    config: FilterConfig,
    count_tokens: Callable[[str], int] | None = None,
    eval_texts: Iterable[str] = (),
) -> list[Check]:
    """(stage, check) pairs for every filter the config turns on: length, quality, language, decontaminate.

    A record is rejected by the first check it fails, so each reject names one stage.

    `count_tokens` is needed only when token bounds are set; `eval_texts` only for decontamination.
    """
    checks: list[Check] = []
    if config.length is not None:
        length = functools.partial(check_length, **config.length.model_dump(), count_tokens=count_tokens)
        checks.append(("filter:length", length))
    if config.quality is not None:
        checks.append(("filter:quality", functools.partial(check_quality, **config.quality.model_dump())))
    if config.language is not None:
        checks.append(("filter:language", functools.partial(check_language, **config.language.model_dump())))
    if config.decontaminate is not None:
        n = config.decontaminate.ngram
        index = build_ngram_index(eval_texts, n)
        checks.append(("filter:decontaminate", functools.partial(check_contamination, index=index, n=n)))
    return checks


def first_failure(record: dict, checks: list[Check]) -> tuple[str, str] | None:
    """(stage, reason) of the first check the record fails, else None."""
    for stage, check in checks:
        reason = check(record)
        if reason:
            return stage, reason
    return None


def split_records(records: Iterable[dict], checks: list[Check]) -> tuple[list[dict], list[dict]]:
    """(kept records, reject rows) for a plain list of records."""
    kept, rejects = [], []
    for record in records:
        failure = first_failure(record, checks)
        if failure:
            rejects.append(reject_for_record(record, *failure))
        else:
            kept.append(record)
    return kept, rejects


def mark_table(table: pa.Table, failures: list[tuple[str, str] | None]) -> pa.Table:
    """`table` with the stage and reason columns added ("" for rows that are kept)."""
    stages = [f[0] if f else "" for f in failures]
    reasons = [f[1] if f else "" for f in failures]
    table = table.append_column(STAGE_COLUMN, pa.array(stages, pa.string()))
    return table.append_column(REASON_COLUMN, pa.array(reasons, pa.string()))


def _mark_batch(batch: pa.Table, checks: list[Check]) -> pa.Table:
    return mark_table(batch, [first_failure(record, checks) for record in batch.to_pylist()])


def _kept_rows(batch: pa.Table, drop: list[str]) -> pa.Table:
    kept = batch.filter(pc.equal(batch[REASON_COLUMN], ""))
    return kept.drop_columns([STAGE_COLUMN, REASON_COLUMN, *drop])


def _reject_dicts(batch: pa.Table) -> list[dict]:
    rejected = batch.filter(pc.not_equal(batch[REASON_COLUMN], ""))
    return [reject_for_record(r, r[STAGE_COLUMN], r[REASON_COLUMN]) for r in rejected.to_pylist()]


def _reject_rows(batch: pa.Table) -> pa.Table:
    return pa.Table.from_pylist(_reject_dicts(batch), schema=REJECT_SCHEMA)


def _quarantine_and_keep(batch: pa.Table, drop: list[str], quarantine: str) -> pa.Table:
    write_rejects(_reject_dicts(batch), quarantine)
    return _kept_rows(batch, drop)


def split_marked(marked: ray.data.Dataset, drop: list[str] = (), quarantine: str | None = None
                 ) -> tuple[ray.data.Dataset, ray.data.Dataset | None]:
    """(kept records, reject rows) from a dataset carrying the stage and reason columns.

    `drop` names helper columns (besides the marks) to remove from the kept records. With a `quarantine`
    directory the rejects are written there as the kept records are consumed (see instune.data.rejects) and
    None is returned for them: `marked` is then read once. Without one, `marked` must have been persisted,
    as each view reads it.
    """
    if quarantine is not None:
        kept = marked.map_batches(_quarantine_and_keep, fn_kwargs={"drop": list(drop), "quarantine": quarantine},
                                  batch_format="pyarrow")
        return kept, None
    kept = marked.map_batches(_kept_rows, fn_kwargs={"drop": list(drop)}, batch_format="pyarrow")
    rejects = marked.map_batches(_reject_rows, batch_format="pyarrow")
    return kept, rejects


def filter_dataset(ds: ray.data.Dataset, checks: list[Check], work_dir: str | None = None,
                   quarantine: str | None = None) -> tuple[ray.data.Dataset, ray.data.Dataset | None]:
    """(kept records, reject rows) for a Ray Dataset.

    With a `quarantine` directory the checks run as the kept records stream on, each task writing its
    rejects there (None is returned for them). Without one, the marked data is computed once, written to
    `work_dir` (or materialized without one, see raydata.persist), and both views read it.
    """
    from instune.data.raydata import persist

    marked = ds.map_batches(_mark_batch, fn_kwargs={"checks": checks}, batch_format="pyarrow")
    if quarantine is not None:
        return split_marked(marked, quarantine=quarantine)
    return split_marked(persist(marked, work_dir))


__all__ = [
    "build_checks",
    "build_ngram_index",
    "check_contamination",
    "check_language",
    "check_length",
    "check_quality",
    "filter_dataset",
    "first_failure",
    "reject_for_record",
    "split_marked",
    "split_records",
]
