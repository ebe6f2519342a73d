"""The data report: `report/report.md` and its PNG figures, written inside the prepared data directory.

What it shows comes from the manifest (counts per source and stage, rejects by kind of reason with an
example each, mixture, tokenization drops) and from one streaming scan of the outputs for what the manifest
does not hold: characters per kept conversation, scores, a language sample (when the language filter ran),
and tokens per packed row. Figures are drawn with matplotlib's Agg backend, so no display is needed.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads

from instune.data.schema import EXAMPLE_CHARS
from instune.report.format import format_cell, markdown_table, pyplot, save_figure

REPORT_DIR = "report"
SCAN_BATCH_ROWS = 4096


# ---------------------------------------------------------------- reading the outputs


def _parquet(directory: Path, columns: list[str]):
    """Batches of `columns` from a directory of Parquet files (none when it is missing or empty)."""
    if not directory.is_dir() or not any(directory.rglob("*.parquet")):
        return
    dataset = pads.dataset(str(directory), format="parquet")
    yield from dataset.to_batches(columns=columns, batch_size=SCAN_BATCH_ROWS)


def conversation_chars(batch) -> np.ndarray:
    """Characters of all message contents of each conversation in a batch (a `messages` list column)."""
    messages = batch.column("messages")
    lengths = pc.utf8_length(pc.struct_field(pc.list_flatten(messages), "content")).to_numpy(zero_copy_only=False)
    owner = np.repeat(np.arange(len(messages)), pc.list_value_length(messages).to_numpy(zero_copy_only=False))
    return np.bincount(owner, weights=lengths, minlength=len(messages)).astype(np.int64)


def language_text(messages: list[dict]) -> str:
    """What the language filter judges: the user and assistant turns (system prompts are often boilerplate)."""
    return "\n".join(m["content"] for m in messages if m["role"] != "system")


def scan_filtered(filtered_dir: Path, kept_total: int, *, sample_size: int, seed: int,
                  score_metric: str | None) -> dict:
    """{"chars": per-record characters, "sample": sampled conversations, "scores": {source: [score]}}."""
    wanted = set(random.Random(seed).sample(range(kept_total), min(sample_size, kept_total)))
    columns = ["source", "messages"] + (["metadata"] if score_metric else [])
    chars, sample, scores, offset = [], [], {}, 0
    for batch in _parquet(filtered_dir, columns):
        chars.append(conversation_chars(batch))
        picked = [i for i in range(batch.num_rows) if offset + i in wanted]
        if picked:
            sample += batch.column("messages").take(picked).to_pylist()
        if score_metric:
            for source, metadata in zip(batch.column("source").to_pylist(), batch.column("metadata").to_pylist()):
                value = json.loads(metadata).get(score_metric) if metadata else None
                if value is not None:
                    scores.setdefault(source, []).append(value)
        offset += batch.num_rows
    return {"chars": np.concatenate(chars) if chars else np.zeros(0, np.int64), "sample": sample, "scores": scores}


def packed_tokens(split_dir: Path) -> np.ndarray:
    """Tokens (before padding) of every packed row of a split."""
    parts = [b.column("num_tokens").to_numpy(zero_copy_only=False) for b in _parquet(split_dir, ["num_tokens"])]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def language_mix(conversations: list[list[dict]]) -> Counter:
    from instune.data.filters.language import detect_language

    return Counter(detect_language(language_text(m))[0] for m in conversations)


# ---------------------------------------------------------------- figures


def _save(fig, path: Path) -> str:
    """Save the figure beside report.md; returns the name the report links."""
    return save_figure(fig, path).name


def stages_figure(sources: dict, stages: list[str], path: Path) -> str:
    """Records remaining after each stage, one line per source."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    for name, counts in sources.items():
        remaining = [counts["read"]] + [row["out"] for row in counts["stages"]]
        ax.plot(range(len(remaining)), remaining, marker="o", label=name)
    ax.set_xticks(range(len(stages) + 1), ["input"] + stages, rotation=30, ha="right")
    ax.set_xlabel("after stage")
    ax.set_ylabel("records remaining")
    ax.set_title("records through each stage")
    ax.legend(fontsize=8)
    return _save(fig, path)


def rejects_figure(rows: list[dict], path: Path, limit: int = 15) -> str:
    """The most frequent kinds of reject reason, summed over sources."""
    plt = pyplot()
    totals = Counter()
    for r in rows:
        totals[f"{r['stage']}: {r['reason']}"[:70]] += r["count"]
    top = totals.most_common(limit)[::-1]
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(top) + 1.2))
    ax.barh([k for k, _ in top], [n for _, n in top], color="#c44e52")
    ax.set_xlabel("records rejected")
    ax.set_title("rejects by reason")
    ax.tick_params(axis="y", labelsize=7)
    return _save(fig, path)


def histogram_figure(values: np.ndarray, path: Path, *, title: str, xlabel: str, log: bool = False,
                     mark: float | None = None) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    values = np.asarray(values, dtype=float)
    bins = np.geomspace(max(values.min(), 1), max(values.max(), 2), 40) if log else 40
    ax.hist(values, bins=bins, color="#4c72b0")
    if log:
        ax.set_xscale("log")
    if mark is not None:
        ax.axvline(mark, color="black", linestyle="--", linewidth=1)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    return _save(fig, path)


def bars_figure(labels: list[str], series: dict[str, list[float]], path: Path, *, title: str, ylabel: str) -> str:
    """Grouped bars: one group per label, one bar per series."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(labels) + 2), 3.5))
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        ax.bar(np.arange(len(labels)) + k * width - 0.4 + width / 2, values, width, label=name)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return _save(fig, path)


# ---------------------------------------------------------------- markdown


def example(text: str) -> str:
    """The start of a record as one cell of code: one line, at most EXAMPLE_CHARS characters."""
    text = format_cell(text)
    return f"`{text[:EXAMPLE_CHARS].replace('`', chr(39))}`" + ("…" if len(text) > EXAMPLE_CHARS else "")


def percentiles(values: np.ndarray) -> str:
    if not len(values):
        return "no records"
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return f"median {p50:,.0f}, p90 {p90:,.0f}, p99 {p99:,.0f}, max {values.max():,.0f} over {len(values):,}"


def write_data_report(data_dir: Path, manifest: dict, *, detect_languages: bool, seed: int = 0,
                      sample_size: int = 500) -> Path:
    """Write `data_dir/report/report.md` and its figures from the manifest and the outputs; return its path."""
    from instune.data.accounting import STAGES, source_table

    out = Path(data_dir) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    sources, mixture, splits = manifest["sources"], manifest["mixture"], manifest.get("splits", {})
    score = (manifest.get("config", {}).get("data") or {}).get("score")
    kept_total = sum(c["kept"] for c in sources.values())
    scanned = scan_filtered(Path(data_dir) / "filtered", kept_total, sample_size=sample_size, seed=seed,
                            score_metric=score["metric"] if score else None)
    md = [f"# Data report\n\nPrepared in {manifest.get('seconds', 0):.1f} s from {len(sources)} sources: "
          f"{sum(c['read'] for c in sources.values()):,} records read, {kept_total:,} kept."]

    # Records dropped at tokenization count as rejected here, not kept (accounting.source_table).
    md.append("## Records per source\n\n" + markdown_table(*source_table(sources)))
    used = [st for st in STAGES if any(row["rejected"] for c in sources.values() for row in c["stages"]
                                       if row["stage"] == st)]
    md.append("## Rejected at each stage\n\n" + markdown_table(
        ["stage"] + list(sources),
        [[st] + [next(r["rejected"] for r in c["stages"] if r["stage"] == st) for c in sources.values()]
         for st in used]) + f"\n\n![records through each stage]({stages_figure(sources, list(STAGES), out / 'stages.png')})")

    reject_rows = [dict(r, source=n) for n, c in sources.items() for r in c["rejects"]]
    if reject_rows:
        rows = [[r["source"], r["stage"], r["reason"], r["count"], example(r.get("example") or r["example_reason"])]
                for r in reject_rows]
        md.append("## Rejects by reason\n\nNumbers in reasons are shown as N; each row has one example "
                  "(the start of the raw record).\n\n"
                  + markdown_table(["source", "stage", "reason", "count", "example"], rows)
                  + f"\n\n![rejects by reason]({rejects_figure(reject_rows, out / 'rejects.png')})")

    dedup = {n: {st: next(r["rejected"] for r in c["stages"] if r["stage"] == st)
                 for st in ("dedup:exact", "dedup:near")} for n, c in sources.items()}
    md.append("## Duplicates found\n\n" + markdown_table(
        ["source", "exact duplicates", "near-duplicates"],
        [[n, d["dedup:exact"], d["dedup:near"]] for n, d in dedup.items()]))

    if score and scanned["scores"]:
        values = np.concatenate([np.asarray(v, float) for v in scanned["scores"].values()])
        figure = histogram_figure(values[np.isfinite(values)], out / "scores.png",
                                  title=f"{score['metric']} of kept records", xlabel=score["metric"])
        md.append(f"## Reference-model scores ({score['metric']})\n\n" + markdown_table(
            ["source", "scored and kept", "median", "rejected at score"],
            [[n, len(v), float(np.median(v)), next(r["rejected"] for r in sources[n]["stages"] if r["stage"] == "score")]
             for n, v in scanned["scores"].items()]) + f"\n\n![scores]({figure})")

    if detect_languages and scanned["sample"]:
        languages = language_mix(scanned["sample"])
        names = [lang for lang, _ in languages.most_common()]
        figure = bars_figure(names, {"records": [languages[lang] for lang in names]}, out / "languages.png",
                             title=f"languages of {len(scanned['sample'])} sampled kept records", ylabel="records")
        md.append(f"## Language mix (sample of {len(scanned['sample'])} kept records)\n\n" + markdown_table(
            ["language", "records", "share"],
            [[lang, n, f"{100 * n / len(scanned['sample']):.1f}%"] for lang, n in languages.most_common()])
            + f"\n\n![languages]({figure})")

    md.append("## Lengths\n\nCharacters per kept conversation: " + percentiles(scanned["chars"]) + ".")
    if len(scanned["chars"]):
        md[-1] += "\n\n![characters per conversation](" + histogram_figure(
            scanned["chars"], out / "conversation_chars.png", title="characters per kept conversation",
            xlabel="characters (log scale)", log=True) + ")"
    for name, stats in splits.items():
        tokens = packed_tokens(Path(data_dir) / name)
        if len(tokens):
            figure = histogram_figure(tokens, out / f"{name}_packed_tokens.png", mark=manifest["seq_len"],
                                      title=f"{name}: tokens per packed row ({stats['packing_efficiency']:.0%} full)",
                                      xlabel=f"tokens before padding (seq_len {manifest['seq_len']})")
            md[-1] += (f"\n\n{name}: {stats['rows']:,} rows hold {stats['examples']:,} examples; tokens per row "
                       f"{percentiles(tokens)}; packing efficiency {stats['packing_efficiency']:.1%}.\n\n"
                       f"![{name} tokens per packed row]({figure})")

    realised = mixture.get("realised", {})
    names = list(mixture["weights"])
    # The weight as configured (3.0, 0.25), not rounded to the table's significant digits.
    rows = [[n, str(mixture["weights"][n]), f"{100 * mixture['requested'].get(n, 0):.1f}%",
             realised.get(n, {}).get("examples", 0), f"{100 * realised.get(n, {}).get('fraction', 0):.1f}%",
             round(mixture["copies_per_record"].get(n, 0), 3)] for n in names]
    md.append("## Mixture (train split)\n\n" + markdown_table(
        ["source", "weight", "requested", "realised examples", "realised", "copies per record"], rows))
    if splits:
        md[-1] += "\n\n![mixture](" + bars_figure(
            names, {"requested": [mixture["requested"].get(n, 0) for n in names],
                    "realised": [realised.get(n, {}).get("fraction", 0) for n in names]},
            out / "mixture.png", title="mixture: requested vs realised", ylabel="share of examples") + ")"
    else:
        md[-1] += "\n\nPhase 2 was left to training (`data.stream`), so no realised mixture is recorded."

    drops = [[split, source, k["reason"], k["count"], k["example_reason"]]
             for split, stats in splits.items() for source, kinds in stats["dropped"].items() for k in kinds]
    if drops:
        md.append("## Dropped at tokenization\n\n"
                  + markdown_table(["split", "source", "reason", "count", "example"], drops))
    adjusted = [[split, source, k["adjustment"], k["records"], k["extra_examples"]]
                for split, stats in splits.items() for source, kinds in stats.get("adjusted", {}).items()
                for k in kinds]
    if adjusted:
        md.append("## Adjusted for the chat template\n\n" + markdown_table(
            ["split", "source", "adjustment", "records", "extra examples"], adjusted))
    if manifest.get("outcomes"):
        md.append("## Outcome labels (kept records)\n\n" + markdown_table(
            ["source", "success", "failure", "unlabelled"],
            [[n, c["success"], c["failure"], c["unlabelled"]] for n, c in manifest["outcomes"].items()]))

    path = out / "report.md"
    path.write_text("\n\n".join(md) + "\n", encoding="utf-8")
    return path
