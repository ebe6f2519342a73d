"""Report sections built from what a run left on disk: config, data manifest and figures, learning curves,
eval results before and after, sweep trials. Each builder returns a list of sections (empty when there is
nothing to show), so callers concatenate what applies and pass it to `document.write_report`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from instune.data.data_report import REPORT_DIR
from instune.data.manifest import MANIFEST
from instune.eval.compare import per_set_rows, summary, summary_rows
from instune.report import figures
from instune.report.document import Code, Image, Section, Table, Text


def config_sections(config_yaml: str) -> list[Section]:
    return [Code(config_yaml, title="config")]


def _scalar_columns(items: dict[str, dict]) -> list[str]:
    """Keys whose values are plain numbers or strings, in first-seen order (nested details are left out)."""
    keys: dict[str, None] = {}
    for fields in items.values():
        for k, v in fields.items():
            if isinstance(v, (int, float, str)) and not isinstance(v, bool):
                keys.setdefault(k)
    return list(keys)


def _named_table(items: dict[str, dict], name_column: str, title: str) -> Table:
    columns = _scalar_columns(items)
    return Table([name_column, *columns], [[name, *(fields.get(c) for c in columns)] for name, fields in items.items()],
                 title=title)


def data_sections(data_dir: str | Path) -> list[Section]:
    """Per-source counts, splits and mixture from `data_dir/manifest.json`, then every PNG in `data_dir/report/`."""
    data_dir = Path(data_dir)
    sections: list[Section] = []
    manifest_file = data_dir / MANIFEST
    if manifest_file.is_file():
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("sources"):
            from instune.data.accounting import source_table

            sections.append(Table(*source_table(manifest["sources"]), title="data: sources"))
        if manifest.get("splits"):
            sections.append(_named_table(manifest["splits"], "split", "data: splits"))
        weights = (manifest.get("mixture") or {}).get("weights")
        if weights:
            sections.append(Table(["source", "weight"], [[k, v] for k, v in weights.items()], title="data: mixture"))
    for png in sorted((data_dir / REPORT_DIR).glob("*.png")):
        sections.append(Image(png, title=f"data: {png.stem.replace('_', ' ')}"))
    return sections


def read_metrics(metrics_file: str | Path) -> list[dict]:
    """The rows of a training metrics.jsonl, in step order; [] if the file does not exist."""
    path = Path(metrics_file)
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r.get("step", 0))


def training_sections(metrics_file: str | Path) -> list[Section]:
    rows = read_metrics(metrics_file)
    if not rows:
        return []
    last = rows[-1]
    return [
        Image(figures.learning_curves_png(rows), title="learning curves"),
        Table(["metric", "value"], [[k, v] for k, v in last.items()],
              title=f"training: last logged step ({last['step']})"),
    ]


def eval_sections(before, after=None, before_label: str = "base", after_label: str = "tuned") -> list[Section]:
    """Summary figures with their change, the per-set table, per-set bars and the in/out-of-domain gap."""
    if not before:
        return []
    s = summary(before)
    lines = [f"{len(before)} eval sets, "
             f"{sum(r.kind == 'in_domain' for r in before)} in-domain and "
             f"{sum(r.kind == 'out_of_domain' for r in before)} out-of-domain. "
             "Means are over domains; the gap is the in-domain mean minus the out-of-domain mean."]
    em = s["exact_match"]
    text = f"{before_label}: exact match {_pct(em['generalisation'])} over all domains, gap {_pct(em['gap'])}"
    if after:
        ea = summary(after)["exact_match"]
        text += (f"; {after_label}: {_pct(ea['generalisation'])}, gap {_pct(ea['gap'])} "
                 f"(change {_pct(ea['generalisation'] - em['generalisation'])}).")
    lines.append(text)
    title_kind = f"{before_label} vs {after_label}" if after else before_label
    return [
        Text("\n\n".join(lines), title=f"evaluation: {title_kind}"),
        Table(*summary_rows(before, after), title="summary figures",
              caption="BLEU and chrF on sacrebleu's 0-100 scale; the others as fractions. "
                      "Lower is better for loss."),
        Table(*per_set_rows(before, after), title="per eval set"),
        Image(figures.domain_bars_png(before, after, before_label, after_label), title="per eval set"),
        Image(figures.gap_png(before, after, before_label, after_label), title="in-domain vs out-of-domain"),
    ]


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.1f}%"


def sweep_sections(trials: list[dict], params: list[str], metric: str, mode: str = "max") -> list[Section]:
    """The trial table (best first) and one plot of `metric` against each hyperparameter.

    `trials` holds one dict per trial: its hyperparameters under the names in `params`, `metric`, and any
    other columns to show (trial id, status, steps). `mode` is "max" or "min".
    """
    assert mode in ("max", "min"), f"mode must be 'max' or 'min', got {mode!r}"
    if not trials:
        return [Text("no trials finished", title="sweep")]
    scored = [t for t in trials if isinstance(t.get(metric), (int, float)) and not math.isnan(t[metric])]
    ordered = sorted(scored, key=lambda t: t[metric], reverse=mode == "max")
    ordered += [t for t in trials if t not in scored]
    columns = list(dict.fromkeys(k for t in trials for k in t))
    sections: list[Section] = []
    if ordered and ordered[0] in scored:
        best = ordered[0]
        sections.append(Text(f"{len(trials)} trials, {len(scored)} with a {metric}. Best ({mode} {metric}): "
                             + ", ".join(f"{p}={best.get(p)}" for p in params) + f" -> {metric} {best[metric]:.4g}.",
                             title="sweep"))
    sections.append(Table(columns, [[t.get(c) for c in columns] for t in ordered], title="trials"))
    if scored and params:
        sections.append(Image(figures.hyperparameter_png(scored, params, metric), title="hyperparameters"))
    return sections


def run_sections(config_yaml: str, *, data_dir: str | Path | None = None, metrics_file: str | Path | None = None,
                 before=None, after=None, before_label: str = "base", after_label: str = "tuned") -> list[Section]:
    """Everything a run report holds that exists: eval first (the answer), then training, data and config."""
    sections: list[Section] = []
    sections += eval_sections(before or [], after, before_label, after_label)
    if metrics_file:
        sections += training_sections(metrics_file)
    if data_dir:
        sections += data_sections(data_dir)
    return sections + config_sections(config_yaml)
