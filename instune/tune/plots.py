"""Sweep plots (PNG, matplotlib's Agg backend, no display needed); each returns its path, or None when
there is nothing to draw. The caller writes them into a directory made atomic as a whole (results.py)."""

from __future__ import annotations

import math
from pathlib import Path

from instune.report.format import pyplot, save_figure

plt = pyplot()

STATUS_MARKERS = {"finished": "o", "stopped": "x"}
CURVE_KEYS = ("loss", "in_domain_loss", "out_of_domain_loss")


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(float(value)) else None


def _grid(count: int, width: float = 4.0, height: float = 3.2):
    cols = min(count, 3)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def plot_objective_vs_params(rows: list[dict], columns: list[str], objective: str, path: Path) -> Path | None:
    """The objective against each swept value (categorical values spread on their own axis)."""
    scored = [r for r in rows if _number(r.get("objective")) is not None]
    if not scored or not columns:
        return None
    fig, axes = _grid(len(columns))
    for ax, column in zip(axes, columns):
        values = [r.get(column) for r in scored]
        numeric = all(_number(v) is not None for v in values)
        labels = sorted({str(v) for v in values})
        for status, marker in STATUS_MARKERS.items():
            points = [(v if numeric else labels.index(str(v)), r["objective"])
                      for v, r in zip(values, scored) if r["status"] == status]
            if points:
                ax.scatter(*zip(*points), marker=marker, label=status)
        if not numeric:
            ax.set_xticks(range(len(labels)), labels)
        elif min(values) > 0 and max(values) >= 100 * min(values):
            ax.set_xscale("log")  # learning rates and other log-uniform ranges
        ax.set_xlabel(column)
        ax.set_ylabel(objective)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"{objective} by swept value")
    return save_figure(fig, path)


def plot_learning_curves(curves: dict[str, list[dict]], path: Path) -> Path | None:
    """Training loss and in-/out-of-domain eval loss against step, one line per trial."""
    keys = [k for k in CURVE_KEYS if any(k in m for lines in curves.values() for m in lines)]
    if not keys:
        return None
    fig, axes = _grid(len(keys), width=4.5)
    for ax, key in zip(axes, keys):
        for trial, lines in sorted(curves.items()):
            points = [(m["step"], m[key]) for m in lines if key in m]
            if points:
                ax.plot(*zip(*points), marker=".", label=trial)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
    axes[0].legend(fontsize="x-small")
    fig.suptitle("learning curves")
    return save_figure(fig, path)


def plot_mix(rows: list[dict], mix_names: list[str], measure: str, path: Path) -> Path | None:
    """Each mixing weight against the in-domain and out-of-domain score of the trials that used it."""
    scores = [f"in_domain_{measure}", f"out_of_domain_{measure}"]
    used = [r for r in rows if r["status"] != "failed" and any(_number(r.get(s)) is not None for s in scores)]
    if not mix_names or not used:
        return None
    fig, axes = _grid(len(mix_names))
    for ax, name in zip(axes, mix_names):
        for score, marker in zip(scores, ("o", "s")):
            points = [(r[f"mix/{name}"], r[score]) for r in used
                      if _number(r.get(f"mix/{name}")) is not None and _number(r.get(score)) is not None]
            if points:
                ax.scatter(*zip(*points), marker=marker, label=score)
        ax.set_xlabel(f"weight of {name}")
        ax.set_ylabel(measure)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"mix weights against in-domain and out-of-domain {measure}")
    return save_figure(fig, path)
