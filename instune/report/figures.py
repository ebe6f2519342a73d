"""Report figures as PNG bytes, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import math

from instune.eval.compare import FIGURES, METRICS, summary
from instune.report.format import figure_png, format_cell, pyplot

plt = pyplot()

BEFORE_COLOR, AFTER_COLOR = "#9e9e9e", "#1f77b4"
BAR_METRICS = ["exact_match", "rouge_l", "chrf", "loss"]


def _finite(value) -> float:
    return 0.0 if value is None or math.isnan(value) else float(value)


def learning_curves_png(metric_rows: list[dict]) -> bytes:
    """Training loss (and validation loss where logged) and learning rate against the optimizer step."""
    assert metric_rows, "no metrics to plot"
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 3.6))
    steps = [r["step"] for r in metric_rows]
    ax_loss.plot(steps, [r["loss"] for r in metric_rows], marker=".", label="train loss")
    evaluated = [r for r in metric_rows if "eval_loss" in r]
    if evaluated:
        ax_loss.plot([r["step"] for r in evaluated], [r["eval_loss"] for r in evaluated], marker="o",
                     label="validation loss")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, [r.get("lr", float("nan")) for r in metric_rows], color="#ff7f0e")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    ax_lr.grid(alpha=0.3)
    return figure_png(fig)


def _by_kind(results):
    """In-domain sets first, then out-of-domain, each in the given order."""
    return [r for r in results if r.kind == "in_domain"] + [r for r in results if r.kind != "in_domain"]


def domain_bars_png(before, after=None, before_label: str = "base", after_label: str = "tuned") -> bytes:
    """One panel per metric, a bar per eval set (before beside after), in-domain sets left of the dashed line."""
    labels = dict(METRICS)
    ordered = _by_kind(before)
    after_by_name = {r.name: r for r in after or []}
    fig, axes = plt.subplots(1, len(BAR_METRICS), figsize=(4 * len(BAR_METRICS), 3.8))
    x = list(range(len(ordered)))
    width = 0.4 if after else 0.7
    in_domain_count = sum(r.kind == "in_domain" for r in ordered)
    for ax, metric in zip(axes, BAR_METRICS):
        shift = -width / 2 if after else 0
        ax.bar([i + shift for i in x], [_finite(getattr(r, metric)) for r in ordered], width,
               color=BEFORE_COLOR if after else AFTER_COLOR, label=before_label)
        if after:
            ax.bar([i + width / 2 for i in x],
                   [_finite(getattr(after_by_name[r.name], metric)) if r.name in after_by_name else 0.0
                    for r in ordered], width, color=AFTER_COLOR, label=after_label)
        if 0 < in_domain_count < len(ordered):
            ax.axvline(in_domain_count - 0.5, color="black", linestyle="--", linewidth=1)
        ax.set_xticks(x)
        ax.set_xticklabels([r.name for r in ordered], rotation=35, ha="right", fontsize=8)
        ax.set_title(labels[metric])
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("per eval set (left of the dashed line: in-domain; right: out-of-domain)", fontsize=10)
    return figure_png(fig)


def gap_png(before, after=None, before_label: str = "base", after_label: str = "tuned") -> bytes:
    """One panel per metric: in-domain mean, out-of-domain mean and generalisation score, before and after."""
    labels = dict(METRICS)
    figures = [f for f, _ in FIGURES if f != "gap"]
    figure_labels = {"generalisation": "all domains", "in_domain": "in-domain", "out_of_domain": "out-of-domain"}
    sb, sa = summary(before), summary(after) if after else None
    fig, axes = plt.subplots(1, len(BAR_METRICS), figsize=(4 * len(BAR_METRICS), 3.6))
    width = 0.4 if sa else 0.7
    x = list(range(len(figures)))
    for ax, metric in zip(axes, BAR_METRICS):
        shift = -width / 2 if sa else 0
        ax.bar([i + shift for i in x], [_finite(sb[metric][f]) for f in figures], width,
               color=BEFORE_COLOR if sa else AFTER_COLOR, label=before_label)
        title = f"{labels[metric]}\ngap {format_cell(sb[metric]['gap'])}"
        if sa:
            ax.bar([i + width / 2 for i in x], [_finite(sa[metric][f]) for f in figures], width,
                   color=AFTER_COLOR, label=after_label)
            title += f" -> {format_cell(sa[metric]['gap'])}"
        ax.set_xticks(x)
        ax.set_xticklabels([figure_labels[f] for f in figures], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    return figure_png(fig)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def hyperparameter_png(trials: list[dict], params: list[str], metric: str) -> bytes:
    """One panel per hyperparameter: each trial's `metric` against its value (log axis across decades)."""
    assert trials and params, "need trials and at least one hyperparameter to plot"
    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.6), squeeze=False)
    for ax, param in zip(axes[0], params):
        points = [(t[param], t[metric]) for t in trials
                  if param in t and _is_number(t.get(metric)) and not math.isnan(t[metric])]
        values = [v for v, _ in points]
        if values and all(_is_number(v) for v in values):
            ax.scatter(values, [m for _, m in points], color=AFTER_COLOR)
            positive = [v for v in values if v > 0]
            if len(positive) == len(values) and max(positive) / min(positive) >= 100:
                ax.set_xscale("log")
        else:  # categorical values: one column per value, in first-seen order
            categories = list(dict.fromkeys(str(v) for v in values))
            ax.scatter([categories.index(str(v)) for v in values], [m for _, m in points], color=AFTER_COLOR)
            ax.set_xticks(range(len(categories)))
            ax.set_xticklabels(categories, rotation=30, ha="right", fontsize=8)
        ax.set(xlabel=param, ylabel=metric, title=param)
        ax.grid(alpha=0.3)
    return figure_png(fig)
