"""Summary figures and table rows: generalisation score, in-domain and out-of-domain means, the gap, and
how each changes from base to tuned. `instune.report.format.markdown_table` renders the rows.

Means are over domains, not sets or examples: each domain's sets are averaged first, so a domain with three
eval sets weighs as much as a domain with one.
"""

from __future__ import annotations

import math

# (field of SetResult, label) of the metrics with summary figures; higher is better for all but loss.
# Perplexity is left out: a mean of perplexities is ruled by the worst domain; exp(the loss figure) is the
# meaningful aggregate.
METRICS = [("exact_match", "exact match"), ("rouge_l", "ROUGE-L"), ("bleu", "BLEU"), ("chrf", "chrF"),
           ("loss", "loss")]
# Summary figure -> label; "gap" is in-domain mean minus out-of-domain mean.
FIGURES = [("generalisation", "generalisation (mean over domains)"), ("in_domain", "in-domain mean"),
           ("out_of_domain", "out-of-domain mean"), ("gap", "gap (in - out)")]


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def domain_means(results, metric: str) -> dict[tuple[str, str], float]:
    """(kind, domain) -> mean of `metric` over that domain's sets."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in results:
        groups.setdefault((r.kind, r.domain), []).append(float(getattr(r, metric)))
    return {key: _mean(values) for key, values in groups.items()}


def summary(results) -> dict[str, dict[str, float]]:
    """metric -> {generalisation, in_domain, out_of_domain, gap}; NaN where a group has no sets."""
    out = {}
    for metric, _ in METRICS:
        means = domain_means(results, metric)
        ind = _mean(v for (kind, _), v in means.items() if kind == "in_domain")
        ood = _mean(v for (kind, _), v in means.items() if kind == "out_of_domain")
        out[metric] = {"generalisation": _mean(means.values()), "in_domain": ind, "out_of_domain": ood,
                       "gap": ind - ood}
    return out


def summary_change(before, after) -> dict[str, dict[str, float]]:
    """metric -> figure -> after minus before (the change from base to tuned)."""
    sb, sa = summary(before), summary(after)
    return {metric: {fig: sa[metric][fig] - sb[metric][fig] for fig in sb[metric]} for metric in sb}


# The per-set table's columns (BLEU is in the summary and the JSON; on short answers it is mostly 0).
TABLE_METRICS = ["exact_match", "rouge_l", "chrf", "loss", "perplexity"]
LABELS = dict(METRICS) | {"perplexity": "perplexity"}


def per_set_rows(before, after=None) -> tuple[list[str], list[list]]:
    """(columns, rows): one row per eval set with the main metrics, before and after when `after` is given."""
    after_by_name = {r.name: r for r in after or []}
    columns = ["set", "domain", "kind", "n"]
    for m in TABLE_METRICS:
        columns += [f"{LABELS[m]} before", f"{LABELS[m]} after"] if after else [LABELS[m]]
    rows = []
    for b in before:
        row = [b.name, b.domain, b.kind, b.examples]
        for m in TABLE_METRICS:
            a = after_by_name.get(b.name)
            row += [getattr(b, m), getattr(a, m) if a else None] if after else [getattr(b, m)]
        rows.append(row)
    return columns, rows


def summary_rows(before, after=None) -> tuple[list[str], list[list]]:
    """(columns, rows): each summary figure per metric; with `after`, its value before, after, and the change."""
    sb, sa = summary(before), summary(after) if after else None
    columns = ["metric", "figure"] + (["before", "after", "change"] if sa else ["value"])
    rows = []
    for metric, label in METRICS:
        for fig, fig_label in FIGURES:
            b = sb[metric][fig]
            rows.append([label, fig_label] + ([b, sa[metric][fig], sa[metric][fig] - b] if sa else [b]))
    return columns, rows
