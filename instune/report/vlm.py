"""The vision-language run's report: the in-domain/out-of-domain table for generation and zero-shot retrieval,
before and after tuning, the gap and its change, their plots, and the data accounting.

Built from the results dict that vlm_run writes to results.json ({before, after: {domain: metrics}, in_domain,
out_of_domain, gap: {before, after}, data: {source: counts and reject reasons}}), so it can be rebuilt from the
file alone. The gap is the mean over in-domain domains minus the mean over out-of-domain ones (retrieval.
domain_gap): the question the run answers is whether tuning shrinks it.
"""

from __future__ import annotations

import math

from instune.report.document import Image, ReportPaths, Section, Table, Text, write_report
from instune.report.format import figure_png, format_cell, pyplot

GENERATION = ("exact_match",)
RETRIEVAL = ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")
LABELS = {"exact_match": "exact match", "i2t_r1": "image->text R@1", "i2t_r5": "image->text R@5",
          "t2i_r1": "text->image R@1", "t2i_r5": "text->image R@5"}
BEFORE_COLOR, AFTER_COLOR = "#9e9e9e", "#1f77b4"


def _value(row: dict, metric: str) -> float | None:
    value = row.get(metric)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _change(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def _domains(results: dict) -> list[tuple[str, str]]:
    """(domain, "in" | "out"), in-domain first, each in the configured order."""
    return [(d, "in") for d in results["in_domain"]] + [(d, "out") for d in results["out_of_domain"]]


def domain_table(results: dict, metrics: tuple[str, ...], title: str, caption: str | None = None) -> Table:
    """One row per domain: each metric before, after and its change; then the in - out gap row."""
    columns = ["domain", "kind"] + [f"{LABELS[m]} {when}" for m in metrics for when in ("before", "after", "change")]
    rows = []
    for domain, kind in _domains(results):
        before, after = results["before"].get(domain, {}), results["after"].get(domain, {})
        cells = []
        for m in metrics:
            b, a = _value(before, m), _value(after, m)
            cells += [b, a, _change(b, a)]
        rows.append([domain, kind, *cells])
    gap_before, gap_after = results["gap"]["before"], results["gap"]["after"]
    cells = []
    for m in metrics:
        b, a = _value(gap_before, m), _value(gap_after, m)
        cells += [b, a, _change(b, a)]
    rows.append(["gap (in - out)", "", *cells])
    return Table(columns, rows, title=title, caption=caption)


def gap_table(results: dict) -> Table:
    """Per metric: the gap before and after, its change, and the change of its size (negative: narrower)."""
    rows = []
    for m in GENERATION + RETRIEVAL:
        b, a = _value(results["gap"]["before"], m), _value(results["gap"]["after"], m)
        rows.append([LABELS[m], b, a, _change(b, a), None if b is None or a is None else abs(a) - abs(b)])
    return Table(["metric", "gap before", "gap after", "change", "size change"], rows, title="gap per metric",
                 caption="Gap: mean over in-domain domains minus mean over out-of-domain ones; change: after minus "
                         "before; size change: |after| - |before|, negative where tuning narrowed the gap.")


def gap_summary(results: dict) -> Text:
    """One paragraph: what was compared, and each retrieval gap before -> after."""
    parts = []
    for m in GENERATION + RETRIEVAL:
        b, a = _value(results["gap"]["before"], m), _value(results["gap"]["after"], m)
        if b is not None and a is not None:
            size_change = abs(a) - abs(b)  # float noise from the means is not a change
            size = "narrower" if size_change < -1e-9 else "wider" if size_change > 1e-9 else "the same size"
            parts.append(f"{LABELS[m]} {format_cell(b)} -> {format_cell(a)} ({size})")
    body = (f"In-domain: {', '.join(results['in_domain'])}. Out-of-domain: {', '.join(results['out_of_domain'])}. "
            "Retrieval scores each image against every distinct caption of its domain's pool by the model's "
            "log-likelihood of the caption given the image (zero-shot: no retrieval training).\n\n"
            "Gap (in - out), before -> after tuning: " + ("; ".join(parts) or "no metric measured on both sides")
            + ".")
    return Text(body, title="the in-domain / out-of-domain gap")


def recall_png(results: dict) -> bytes:
    """One panel per recall (image->text and text->image, @1 and @5): a bar per domain, before beside after,
    in-domain left of the dashed line; image->text panels mark each pool's chance level."""
    plt = pyplot()
    domains = _domains(results)
    fig, axes = plt.subplots(1, len(RETRIEVAL), figsize=(4 * len(RETRIEVAL), 3.8))
    x = list(range(len(domains)))
    in_count = sum(kind == "in" for _, kind in domains)
    for ax, metric in zip(axes, RETRIEVAL):
        for shift, when, color in ((-0.2, "before", BEFORE_COLOR), (0.2, "after", AFTER_COLOR)):
            values = [_value(results[when].get(d, {}), metric) for d, _ in domains]
            ax.bar([i + shift for i in x], [v or 0.0 for v in values], 0.4, color=color, label=when)
        if metric.startswith("i2t_"):
            chance = [_value(results["before"].get(d, {}), metric.replace("i2t_", "i2t_chance_")) for d, _ in domains]
            if any(c is not None for c in chance):
                ax.scatter(x, [c if c is not None else math.nan for c in chance], marker="_", s=300,
                           color="black", label="chance", zorder=3)
        if 0 < in_count < len(domains):
            ax.axvline(in_count - 0.5, color="black", linestyle="--", linewidth=1)
        ax.set_xticks(x)
        ax.set_xticklabels([d for d, _ in domains], rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(LABELS[metric], fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("zero-shot retrieval per domain (left of the dashed line: in-domain; right: out-of-domain)",
                 fontsize=10, y=1.03)
    return figure_png(fig)


def gap_png(results: dict) -> bytes:
    """The gap (in - out) of each metric before beside after: bars that move toward 0 mean a narrower gap."""
    plt = pyplot()
    metrics = GENERATION + RETRIEVAL
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = list(range(len(metrics)))
    for shift, when, color in ((-0.2, "before", BEFORE_COLOR), (0.2, "after", AFTER_COLOR)):
        ax.bar([i + shift for i in x], [_value(results["gap"][when], m) or 0.0 for m in metrics], 0.4,
               color=color, label=when)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels([LABELS[m] for m in metrics], rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="in-domain - out-of-domain", title="gap before and after tuning")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return figure_png(fig)


def data_tables(data: dict) -> list[Table]:
    """Records read, kept, rejected, tokenized and dropped per source; then every reject reason with its count."""
    columns = ["read", "kept", "rejected", "tokenized", "dropped"]
    tables = [Table(["source", *columns], [[s, *(c.get(k) for k in columns)] for s, c in data.items()],
                    title="data: records per source",
                    caption="read = kept + rejected (read, normalise, image and dedup:exact stages); "
                            "kept = tokenized + dropped (tokenize).")]
    reasons = [[s, r["stage"], r["reason"], r["count"], r.get("example", "")]
               for s, c in data.items() for r in c.get("rejects", [])]
    if reasons:
        tables.append(Table(["source", "stage", "reason", "records", "example"], reasons,
                            title="data: rejected and dropped records by reason"))
    return tables


def vlm_sections(results: dict) -> list[Section]:
    """The report's sections, the answer first: gap summary and tables, plots, then the data accounting."""
    return [
        gap_summary(results),
        gap_table(results),
        Image(gap_png(results), title="the gap before and after"),
        domain_table(results, RETRIEVAL, "zero-shot retrieval per domain",
                     caption="Chance (image->text R@1) per pool: " + ", ".join(
                         f"{d} {format_cell(_value(results['before'].get(d, {}), 'i2t_chance_r1'))}"
                         for d, _ in _domains(results)) + "."),
        Image(recall_png(results), title="recall@1 and @5 per domain"),
        domain_table(results, GENERATION, "generation per domain"),
        *data_tables(results.get("data", {})),
    ]


def write_vlm_report(out_dir, title: str, results: dict, metrics_file, config_yaml: str) -> ReportPaths:
    """report.html and report.md under `out_dir`: vlm_sections, the learning curves, and the resolved config."""
    from instune.report.sections import config_sections, training_sections

    return write_report(out_dir, title, vlm_sections(results) + training_sections(metrics_file)
                        + config_sections(config_yaml))
