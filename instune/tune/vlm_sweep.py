"""The VLM sweep: Ray Tune trials of the multimodal experiment (vlm_run.py), the table that answers issue 19's
question: how much does tuning on multimodal instruction data, against text-only data, change the gap between
in-domain and out-of-domain images, in generation and in zero-shot retrieval?

The corpus (image tasks and the text-only tasks a share mixes in), the base model, the prepared rows and the base
model's scores ("before", the same for every trial) are made once; each trial takes its sampled values
(`sweep.params`, usually data.multimodal_share), trains on Ray Train inside the trial, and scores its model
("after"). Everything is under `<output_dir>/sweep/`: trials/<id>/ (the trial's Train run, model and
result.json), tune/ (Tune's state), results.json and results.md (one row per trial, sorted by the sweep values).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from instune.atomic import write_json, write_text
from instune.config import VlmExperimentConfig

SWEEP_DIR = "sweep"
# What a trial may not change: the data and model the sweep prepared once, and what the scores are measured on.
FIXED_PATHS = ("name", "output_dir", "sweep", "model", "corpus", "data.sources", "data.eval_sources", "data.images",
               "data.dedup_exact", "eval", "scaling")
# Columns of the table: each metric's gap (in-domain minus out-of-domain), before -> after.
GAP_METRICS = ("exact_match", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")


@dataclass
class VlmTrialPlan:
    """What every trial shares: the config tree, the base model, the prepared rows and eval sets, the scores
    before tuning."""

    tree: dict
    sweep_dir: str
    model_dir: str
    data_dir: str
    eval_sets: list[dict]
    in_domain: list[str]
    out_of_domain: list[str]


def check_vlm_sweep(config: VlmExperimentConfig) -> None:
    """Every swept path names a setting a trial may change; raises UserError before Ray starts."""
    from instune.tune.space import check_param_paths

    check_param_paths(config.model_dump(mode="json"), list(config.sweep.params), FIXED_PATHS)


def run_vlm_sweep(config: VlmExperimentConfig) -> dict:
    """Prepare once, score the base model, run the trials on Ray Tune; return (and write) the results."""
    from ray import tune

    from instune.ray_runtime import stop_ray
    from instune.tune.space import tune_domain
    from instune.vlm_run import gaps, prepare_and_score_base

    check_vlm_sweep(config)
    out = Path(config.output_dir)
    sweep_dir = out / SWEEP_DIR
    sweep_dir.mkdir(parents=True, exist_ok=True)
    base = prepare_and_score_base(config, out)
    before, in_domain, out_of_domain = base.before, base.in_domain, base.out_of_domain
    plan = VlmTrialPlan(config.model_dump(mode="json"), str(sweep_dir.resolve()), base.model_dir,
                        str((out / "data").resolve()), base.eval_sets, in_domain, out_of_domain)

    sweep = config.sweep
    # One trial at a time: a trial's Train run takes the workers the cluster was sized for.
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(run_vlm_trial, plan=plan), {"memory": 1}),
        param_space={path: tune_domain(space, grid=True) for path, space in sweep.params.items()},
        tune_config=tune.TuneConfig(num_samples=sweep.num_samples, max_concurrent_trials=1, reuse_actors=False,
                                    search_alg=_variant_generator(sweep.seed)),
        run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir.resolve()), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=True)))
    grid = tuner.fit()
    trials = sorted((dict(r.metrics) for r in grid if r.error is None),
                    key=lambda t: [t["values"][p] for p in sweep.params])
    errors = [str(r.error).strip().splitlines()[-1] for r in grid if r.error is not None]
    results = {"params": list(sweep.params), "in_domain": in_domain, "out_of_domain": out_of_domain,
               "before": before, "gap_before": gaps(before, in_domain, out_of_domain),
               "trials": [{k: t[k] for k in ("trial_id", "values", "after", "gap_after")} for t in trials],
               "failed": errors}
    write_json(sweep_dir / "results.json", results)
    table = sweep_table(results)
    write_text(sweep_dir / "results.md", table + "\n")
    print(table, flush=True)
    print(f"[sweep] wrote {sweep_dir / 'results.json'} and {sweep_dir / 'results.md'}", flush=True)
    stop_ray()
    if errors:
        raise RuntimeError(f"{len(errors)} trial(s) failed; the first: {errors[0]}")
    return results


def _variant_generator(seed: int):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed, max_concurrent=1)


def run_vlm_trial(sampled: dict, plan: VlmTrialPlan) -> None:
    """The Tune function trainable: train with the sampled values, score the model, report the gap."""
    import ray.tune

    from instune.tune.space import apply_overrides
    from instune.vlm_run import evaluate_model, gaps, train

    trial_id = ray.tune.get_context().get_trial_id()
    trial_dir = Path(plan.sweep_dir) / "trials" / trial_id
    config = VlmExperimentConfig.model_validate(apply_overrides(plan.tree, sampled))
    merged = train(config, plan.model_dir, trial_dir, data_dir=Path(plan.data_dir))
    after = evaluate_model(str(merged), plan.eval_sets, config)
    result = {"trial_id": trial_id, "values": sampled, "after": after,
              "gap_after": gaps(after, plan.in_domain, plan.out_of_domain)}
    write_json(trial_dir / "result.json", result)
    ray.tune.report(result)


def sweep_table(results: dict) -> str:
    """One row per trial: its values, mean exact match in- and out-of-domain after, and each gap before -> after.
    `before` is the base model's, the same in every row."""
    from instune.report.format import markdown_table

    def mean(scores: dict, domains: list[str]) -> float | None:
        values = [scores[d]["exact_match"] for d in domains if "exact_match" in scores.get(d, {})]
        return sum(values) / len(values) if values else None

    columns = [*results["params"], "exact_match in", "exact_match out",
               *[f"gap {m} (before -> after)" for m in GAP_METRICS]]
    rows = []
    for trial in results["trials"]:
        cells = [trial["values"][p] for p in results["params"]]
        cells += [mean(trial["after"], results["in_domain"]), mean(trial["after"], results["out_of_domain"])]
        cells += [_change(results["gap_before"].get(m), trial["gap_after"].get(m)) for m in GAP_METRICS]
        rows.append(cells)
    return markdown_table(columns, rows)


def _change(before, after) -> str:
    if before is None or after is None:
        return "-"
    return f"{before:+.2f} -> {after:+.2f}"
