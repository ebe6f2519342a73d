"""What a sweep leaves behind: every trial in a table sorted by the objective, the best config, plots.

A trial is `finished` (trained to the end and scored; final.json), `stopped` (ASHA ended it early; its
last report counts), or `failed` (error.txt: a bad sampled value, an out-of-memory, ...). Failed trials
are listed last with their error.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ray import tune

from instune import storage
from instune.atomic import atomic_dir, write_text
from instune.report.format import format_cell, markdown_table
from instune.tune.objective import KINDS, MEASURE_PREFIXES, PAIR_SCORES, mode_of, with_objective
from instune.tune.trial import ERROR_FILE, FINAL_FILE, SAMPLED_FILE, TRIAL_FILE, TrialPlan, trial_dir_of

if TYPE_CHECKING:
    from instune.config import SweepConfig

SCORE_NAMES = [f"{scope}_{measure}" for measure in MEASURE_PREFIXES
               for scope in (*KINDS, "generalisation", "gap")] + list(PAIR_SCORES)


@dataclass
class SweepPaths:
    sweep_dir: Path
    experiment_dir: Path  # Tune's experiment state
    results_md: Path
    results_csv: Path
    best_config: Path | None  # None when no trial produced a result
    plots: list[Path]


class TrialLines(tune.Callback):
    """One line per trial as it ends, instead of Tune's status tables."""

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        how = "finished" if result.get("finished") else "stopped early"
        print(f"[sweep] trial {trial.trial_id} {how} at step {result.get('step')}: "
              f"objective {format_cell(result.get('objective'))}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[sweep] trial {trial.trial_id} failed; the sweep goes on", flush=True)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def last_line(error) -> str:
    """The message of a Tune trial error: the last non-empty line of its text."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def trial_id_of(result) -> str:
    """The id of the trial behind a Tune result, which names its directory under the sweep's trials/.

    Not simply the name of Tune's own trial directory: Tune adds "_" and four hex digits to that name when the
    directory exists already, as it does for a trial that had started before a killed sweep was resumed.
    """
    reported = (result.metrics or {}).get("trial_id")
    return reported or re.sub(r"_[0-9a-f]{4}$", "", Path(result.path).name)


def trial_row(result, plan, param_paths: list[str]) -> dict:
    """One trial's row: status, objective, steps, values, mix weights, scores, per-set results, error."""
    trial_id = trial_id_of(result)
    trial_dir = trial_dir_of(plan.sweep_dir, trial_id)
    final, trial = read_json(trial_dir / FINAL_FILE), read_json(trial_dir / TRIAL_FILE)
    # Tune decides what failed: a trial ASHA stops can raise on its way out (its Train run is torn down)
    # and leave an error file, yet it was stopped, not failed. The file holds the cleaner message.
    error = ""
    if result.error is not None:
        error_file = trial_dir / ERROR_FILE
        error = error_file.read_text(encoding="utf-8").strip() if error_file.is_file() else last_line(result.error)
    metrics = final or dict(result.metrics or {})
    status = "failed" if error else "finished" if final else "stopped"
    row = {"trial": trial_id, "status": status,
           "objective": None if error else metrics.get("objective"), "steps": metrics.get("step")}
    sampled = result.config or read_json(trial_dir / SAMPLED_FILE)
    row.update({path: sampled.get(path) for path in param_paths})
    weights = trial.get("mix", {})
    row.update({f"mix/{name}": weights.get(name) for name in plan.mix_names})
    if not error:
        row.update({k: v for k, v in with_objective(metrics, plan.set_kinds, plan.objective).items()
                    if k in SCORE_NAMES or k.startswith(tuple(MEASURE_PREFIXES.values()))})
    row["error"] = error
    row["overrides"] = trial.get("overrides")
    return row


def sort_rows(rows: list[dict], objective: str) -> list[dict]:
    """Best first by the objective; trials without one (failed) last."""
    sign = -1 if mode_of(objective) == "max" else 1

    def key(row):
        value = row.get("objective")
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        return (missing, 0.0 if missing else sign * value)

    return sorted(rows, key=key)


def table_columns(rows: list[dict], param_paths: list[str], mix_names: list[str], per_set: bool) -> list[str]:
    """Columns that hold a value in some row, in reading order; per-set results only when `per_set`."""
    columns = ["trial", "status", "objective", "steps", *param_paths, *[f"mix/{n}" for n in mix_names],
               *SCORE_NAMES]
    if per_set:
        columns += sorted({k for row in rows for k in row if k.startswith(tuple(MEASURE_PREFIXES.values()))})
    columns.append("error")
    return [c for c in columns if any(row.get(c) not in (None, "") for row in rows)]


def ranked_table(rows: list[dict], columns: list[str]) -> str:
    """The trials as a Markdown table, ranked as `rows` are sorted."""
    return markdown_table(["rank", *columns],
                          [[rank, *(row.get(c) for c in columns)] for rank, row in enumerate(rows, 1)])


def csv_text(rows: list[dict], columns: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["rank", *columns], extrasaction="ignore")
    writer.writeheader()
    for rank, row in enumerate(rows, 1):
        writer.writerow({"rank": rank, **row})
    return out.getvalue()


def best_config_tree(tree: dict, best: dict, plan, sweep_dir: Path) -> dict:
    """The base config with the best trial's values: a plain training config (no sweep) of its own."""
    from instune.tune.domains import write_domain_sources
    from instune.tune.space import apply_overrides

    config = apply_overrides(tree, best["overrides"] or {})
    if plan.mix_by == "domain":
        weights = {name: best[f"mix/{name}"] for name in plan.mix_names if best[f"mix/{name}"] > 0}
        files = write_domain_sources(Path(plan.filtered_dir), sweep_dir / "best_sources", sorted(weights))
        config["data"]["sources"] = [{"name": name, "path": str(files[name].resolve()), "format": "openai",
                                      "domain": name, "weight": w} for name, w in weights.items()]
    config["sweep"] = None
    config["name"] = f"{tree['name']}-best"
    config["output_dir"] = storage.join(tree["output_dir"], "best")
    return config


def write_best_config(tree: dict, rows: list[dict], plan, sweep_dir: Path) -> Path | None:
    from instune.config import config_to_yaml, validate_config

    best = next((row for row in rows if row["objective"] is not None and row["overrides"] is not None), None)
    if best is None:
        return None
    config = validate_config(best_config_tree(tree, best, plan, sweep_dir), "best sweep trial")
    path = sweep_dir / "best_config.yaml"
    header = (f"# Best trial {best['trial']} ({best['status']}) of sweep {tree['name']}: "
              f"{plan.objective} = {format_cell(best['objective'])}.\n# Train it: instune run {path}\n")
    write_text(path, header + config_to_yaml(config))
    return path


def learning_curves(rows: list[dict], plan) -> dict[str, list[dict]]:
    """trial -> its training reports (metrics.jsonl) with scores, for every trial that reported."""
    curves = {}
    for row in rows:
        metrics_file = trial_dir_of(plan.sweep_dir, row["trial"]) / "train" / "run" / "metrics.jsonl"
        if metrics_file.is_file():
            lines = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
            curves[row["trial"]] = [with_objective(m, plan.set_kinds, plan.objective) for m in lines]
    return curves


def write_results(results, plan: TrialPlan, sweep: SweepConfig, tree: dict, sweep_dir: Path, experiment_dir: Path):
    """Tables, best config and plots from Tune's ResultGrid; returns SweepPaths."""
    from instune.tune.plots import plot_learning_curves, plot_mix, plot_objective_vs_params

    param_paths = list(sweep.params)
    rows = sort_rows([trial_row(r, plan, param_paths) for r in results], plan.objective)
    md = sweep_dir / "results.md"
    summary = {s: sum(row["status"] == s for row in rows) for s in ("finished", "stopped", "failed")}
    write_text(md, f"# Sweep {tree['name']}: {len(rows)} trials, objective {plan.objective} "
                   f"({mode_of(plan.objective)})\n\n"
                   + ", ".join(f"{n} {s}" for s, n in summary.items()) + "\n\n"
                   + ranked_table(rows, table_columns(rows, param_paths, plan.mix_names, per_set=False)) + "\n")
    csv_path = write_text(sweep_dir / "results.csv",
                          csv_text(rows, table_columns(rows, param_paths, plan.mix_names, per_set=True)))
    best = write_best_config(tree, rows, plan, sweep_dir)
    plots_dir = sweep_dir / "plots"
    measure = plan.objective.rsplit("_", 1)[1]
    with atomic_dir(plots_dir) as tmp:
        drawn = [p for p in (
            plot_objective_vs_params(rows, param_paths + [f"mix/{n}" for n in plan.mix_names], plan.objective,
                                     tmp / "objective_vs_params.png"),
            plot_learning_curves(learning_curves(rows, plan), tmp / "learning_curves.png"),
            plot_mix(rows, plan.mix_names, measure, tmp / "mix_vs_domains.png"),
        ) if p is not None]
    plots = [plots_dir / p.name for p in drawn]
    print(f"[sweep] {len(rows)} trials: " + ", ".join(f"{n} {s}" for s, n in summary.items()), flush=True)
    print(f"[sweep] results: {md}\n[sweep] best config: {best}", flush=True)
    return SweepPaths(sweep_dir, experiment_dir, md, csv_path, best, plots)
