"""The search space: the config's `sweep` ranges as Ray Tune domains, and a trial's sampled values as config.

Tune samples flat keys: every `params` entry under its dotted config path ("train.lr") and every mix weight
under "mix.<name>". A trial turns them back into overrides of the base config tree (mix weights put on the
simplex first) and validates the result like a loaded config, so a bad sampled value fails that trial only.
"""

from __future__ import annotations

import copy
from typing import Any

from instune.config import SearchSpaceConfig, SweepConfig
from instune.errors import UserError

MIX_PREFIX = "mix."

# Settings a trial cannot change: they name the experiment, build the base model or shape the prepared
# data, all of which a sweep makes once for every trial. Mix weights go through `sweep.mix`.
FIXED_PATHS = ("name", "output_dir", "sweep", "model.path", "model.tokenizer_path", "model.embedded",
               "model.chat_template", "data.corpus", "data.sources", "data.filters", "data.dedup", "data.max_record_bytes",
               "data.score", "eval.sets")


def tune_domain(space: SearchSpaceConfig, grid: bool):
    """One range as a Tune domain; a choice list becomes a grid axis under grid search."""
    from ray import tune

    if space.choice is not None:
        return tune.grid_search(list(space.choice)) if grid else tune.choice(list(space.choice))
    if space.uniform is not None:
        return tune.uniform(*space.uniform)
    if space.loguniform is not None:
        return tune.loguniform(*space.loguniform)
    low, high = space.randint
    return tune.randint(low, high + 1)  # Tune's upper bound is exclusive, ours inclusive


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    """Tune's param_space: dotted config paths, then "mix.<name>" weights (fixed numbers stay constants)."""
    from ray import tune

    grid = sweep.search == "grid"
    space: dict[str, Any] = {path: tune_domain(s, grid) for path, s in sweep.params.items()}
    mix = sweep.mix
    if mix is not None and mix.dirichlet is not None:
        # Uniforms, turned into Dirichlet draws in the trial (dirichlet_weights): every searcher, Optuna
        # included, can sample and model a uniform.
        space.update({MIX_PREFIX + name: tune.uniform(0.0, 1.0) for name in mix.dirichlet.names})
    elif mix is not None:
        space.update({MIX_PREFIX + name: w if isinstance(w, float) else tune_domain(w, grid)
                      for name, w in mix.weights.items()})
    return space


def mix_names(sweep: SweepConfig) -> list[str]:
    mix = sweep.mix
    if mix is None:
        return []
    return list(mix.dirichlet.names) if mix.dirichlet is not None else list(mix.weights)


def dirichlet_weights(uniforms: dict[str, float], alpha: float) -> dict[str, float]:
    """Gamma(alpha, 1) quantiles of independent uniforms; normalised, they are one Dirichlet(alpha) draw."""
    from scipy.special import gammaincinv

    return {name: float(gammaincinv(alpha, u)) for name, u in uniforms.items()}


def mix_weights(sampled: dict[str, Any], names: list[str], dirichlet_alpha: float | None) -> dict[str, float]:
    """The trial's mixture weights on the simplex (they sum to 1)."""
    raw = {name: float(sampled[MIX_PREFIX + name]) for name in names}
    if dirichlet_alpha is not None:
        raw = dirichlet_weights(raw, dirichlet_alpha)
    total = sum(raw.values())
    if total <= 0:
        raise UserError(f"sweep.mix: every weight of this trial is 0 ({raw}), so its mixture would be empty")
    return {name: w / total for name, w in raw.items()}


def param_overrides(sampled: dict[str, Any]) -> dict[str, Any]:
    """The sampled values that are config settings (not mix weights), by dotted path."""
    return {k: v for k, v in sampled.items() if not k.startswith(MIX_PREFIX)}


def source_weight_overrides(tree: dict, weights: dict[str, float]) -> dict[str, float]:
    """Mix weights by source name -> overrides of `data.sources.<i>.weight`."""
    index = {s["name"]: i for i, s in enumerate(tree["data"]["sources"])}
    return {f"data.sources.{index[name]}.weight": w for name, w in weights.items()}


def _walk(tree: Any, dotted: str) -> tuple[Any, Any]:
    """(the node holding the last key, the last key), or a KeyError naming the first missing part."""
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys):
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            key = int(key)
        elif not (isinstance(node, dict) and key in node):
            raise KeyError(".".join(keys[: i + 1]))
        if i == len(keys) - 1:
            return node, key
        node = node[key]


def apply_overrides(tree: dict, overrides: dict[str, Any]) -> dict:
    """A copy of the config tree with each dotted path set (paths are checked by check_param_paths)."""
    tree = copy.deepcopy(tree)
    for dotted, value in overrides.items():
        node, key = _walk(tree, dotted)
        node[key] = value
    return tree


def check_param_paths(tree: dict, paths: list[str], fixed_paths: tuple[str, ...] = FIXED_PATHS) -> None:
    """Every swept path names an existing setting of the full (defaults filled in) config that a trial may change
    (not one of `fixed_paths` or below it)."""
    for path in paths:
        fixed = next((f for f in fixed_paths if path == f or path.startswith(f + ".")), None)
        if fixed is not None:
            hint = "; weight sources or domains with sweep.mix" if fixed == "data.sources" else ""
            raise UserError(f"sweep.params.{path}: {fixed} is fixed for the whole sweep and cannot vary by "
                            f"trial{hint}")
        try:
            _walk(tree, path)
        except KeyError as e:
            raise UserError(f"sweep.params.{path}: no such config setting ({e.args[0]} is not in the config)") \
                from None
