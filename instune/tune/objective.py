"""Sweep objectives: per-eval-set results -> in-domain, out-of-domain, generalisation and gap scores.

Per-set values arrive as `eval_loss/<set>` (the training loop, at every report) and `accuracy/<set>` (exact
match of the finished model). Each measure gets four scores, from the sets present:
  in_domain_<m>       mean over the in-domain sets
  out_of_domain_<m>   mean over the out-of-domain sets
  generalisation_<m>  mean over every set
  gap_<m>             how much worse out-of-domain is: ood - in-domain loss, or in-domain - ood accuracy
A gap alone rewards a model that is equally bad everywhere; it is meant beside the others, not instead.

A preference sweep may score its held-out pairs instead: the loop reports `eval_rewards/accuracy` and
`eval_rewards/margin` at every eval, which become `reward_accuracy` and `reward_margin`.
"""

from __future__ import annotations

from statistics import fmean

from instune.config import PAIR_SWEEP_OBJECTIVES

MEASURE_PREFIXES = {"loss": "eval_loss/", "accuracy": "accuracy/"}
KINDS = ("in_domain", "out_of_domain")
# Held-out pair scores (named once, in config.PAIR_SWEEP_OBJECTIVES) and the loop's metric each is read from.
PAIR_SCORES = dict(zip(PAIR_SWEEP_OBJECTIVES, ("eval_rewards/accuracy", "eval_rewards/margin"), strict=True))


def mode_of(objective: str) -> str:
    """"max" for accuracies other than the gap and for the pair scores, else "min"."""
    if objective in PAIR_SCORES:
        return "max"
    return "max" if objective.endswith("_accuracy") and not objective.startswith("gap_") else "min"


def measure_of(objective: str) -> str:
    return objective.rsplit("_", 1)[1]


def scores(metrics: dict, set_kinds: dict[str, str], measure: str) -> dict[str, float]:
    """The four scores of one measure; a score whose sets have no value yet is left out."""
    prefix = MEASURE_PREFIXES[measure]
    values = {name: float(metrics[prefix + name]) for name in set_kinds if prefix + name in metrics}
    by_kind = {kind: [v for name, v in values.items() if set_kinds[name] == kind] for kind in KINDS}
    out = {f"{kind}_{measure}": fmean(v) for kind, v in by_kind.items() if v}
    if values:
        out[f"generalisation_{measure}"] = fmean(values.values())
    if all(by_kind.values()):
        in_domain, out_of_domain = out[f"in_domain_{measure}"], out[f"out_of_domain_{measure}"]
        out[f"gap_{measure}"] = out_of_domain - in_domain if measure == "loss" else in_domain - out_of_domain
    return out


def with_objective(metrics: dict, set_kinds: dict[str, str], objective: str) -> dict:
    """`metrics` plus every score it allows, and `objective` (the configured score) once that is known."""
    out = dict(metrics)
    for measure in MEASURE_PREFIXES:
        out.update(scores(metrics, set_kinds, measure))
    out.update({score: float(metrics[key]) for score, key in PAIR_SCORES.items() if key in metrics})
    if objective in out:
        out["objective"] = out[objective]
    return out


def sets_needed(objective: str) -> tuple[str, ...]:
    """The eval set kinds an objective cannot be computed without (none for the pair scores)."""
    if objective in PAIR_SCORES:
        return ()
    scope = objective.rsplit("_", 1)[0]
    return {"in_domain": ("in_domain",), "out_of_domain": ("out_of_domain",), "gap": KINDS}.get(scope, ())
