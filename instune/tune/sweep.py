"""The sweep driver (`instune sweep`): check the config, plan the trials, run or resume them on Ray Tune.

The prepared data (`data/filtered/`) is shared; every trial draws its own mixture from it (trial.py). A sweep of
a preference objective (dpo, ipo, cdpo, simpo, orpo; train.objective may be swept among them) trains every
trial on the same prepared pairs instead, reference log-probs included (computed once, in prepare, when any
swept objective needs them), and may score trials on the held-out pairs (sweep.objective reward_accuracy or
reward_margin).
Everything the sweep writes is under `<output_dir>/sweep/`:
  sweep_config.yaml   the config this sweep runs; a rerun with another config is refused
  eval_data/          eval sets tokenized for loss during training
  by_domain/          the prepared records keyed by domain (mix.by: domain)
  tune/               Tune's experiment state: an interrupted sweep resumes from it
  trials/<id>/        one trial's values, training run, adapter and final metrics (trial.py)
  results.md, results.csv, best_config.yaml, plots/   (results.py)

With a URI output_dir, `tune/` and the trials' Train runs live in the bucket (Tune's and Ray Train's storage
path), the trials' files are copied there as each ends, and the results are uploaded at the end. The trials
read their inputs (data/filtered, eval_data/) from the driver's scratch directory, so such a sweep runs its
trials on the driver's node.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from instune import storage
from instune.config import PAIR_SWEEP_OBJECTIVES, uses_reference
from instune.errors import UserError
from instune.tune.objective import mode_of, sets_needed
from instune.tune.results import SweepPaths
from instune.tune.space import check_param_paths, mix_names, param_space
from instune.tune.trial import RESULT_FILES, TRIALS_DIR, TrialPlan, run_trial

if TYPE_CHECKING:
    from instune.config import ExperimentConfig, ScalingConfig, SweepConfig

TUNE_DIR = "tune"
SWEEP_CONFIG = "sweep_config.yaml"
# ASHA never stops a trial for reaching max_t: every trial runs its own steps, and rungs sit at
# grace_steps * reduction_factor^k below this.
NO_STEP_LIMIT = 2**31


def check_sweep(config: ExperimentConfig, tree: dict) -> None:
    """Everything about the sweep section that can be checked before Ray starts; raises UserError."""
    sweep = config.sweep
    if sweep is None:
        raise UserError("sweep: the config has no sweep section; add one (see configs/sweep_quickstart.yaml)")
    check_param_paths(tree, list(sweep.params))
    objectives = swept_objectives(config)
    if "sft" in objectives and len(objectives) > 1:
        raise UserError(f"sweep.params.train.objective: sft trains on conversations and {objectives[-1]} on "
                        "preference pairs, which are prepared differently; sweep one kind")
    if (config.train.objective == "sft") != (objectives[0] == "sft"):
        raise UserError(f"train.objective: {config.train.objective}, but the sweep trains {', '.join(objectives)}; "
                        "set train.objective to one of them (it decides how the data is prepared)")
    if objectives != ["sft"]:
        check_preference_sweep(config)
    elif sweep.objective in PAIR_SWEEP_OBJECTIVES:
        raise UserError(f"sweep.objective: {sweep.objective} scores held-out preference pairs, but train.objective "
                        "is sft; use a loss or accuracy objective")
    if sweep.objective in PAIR_SWEEP_OBJECTIVES:
        return
    kinds = {s.kind for s in config.eval.sets}
    if not kinds:
        raise UserError("eval.sets: a sweep scores trials on the eval sets; configure at least one")
    missing = [k for k in sets_needed(sweep.objective) if k not in kinds]
    if missing:
        raise UserError(f"sweep.objective: {sweep.objective} needs an eval set of kind {missing[0]} in eval.sets")
    if sweep.mix is not None and sweep.mix.by == "source":
        check_mix_names(mix_names(sweep), [s.name for s in config.data.sources], "source")


def swept_objectives(config: ExperimentConfig) -> list[str]:
    """The train.objective values the sweep's trials train: the swept choices, or the base config's."""
    space = config.sweep.params.get("train.objective") if config.sweep else None
    if space is None:
        return [config.train.objective]
    if space.choice is None:
        raise UserError("sweep.params.train.objective: give a choice list of objectives, not a range")
    return list(space.choice)


def check_preference_sweep(config: ExperimentConfig) -> None:
    """A sweep of preference objectives: what its shared, unmixed pairs allow; raises UserError."""
    if config.sweep.mix is not None:
        raise UserError("sweep.mix: preference pairs are not mixed (every trial trains on the prepared pairs); "
                        "remove sweep.mix")
    if config.sweep.objective in PAIR_SWEEP_OBJECTIVES and not config.data.validation_fraction:
        raise UserError(f"sweep.objective: {config.sweep.objective} scores held-out pairs; set "
                        "data.validation_fraction above 0")
    # The config check sees only the base objective: a simpo/orpo base can sweep into a loss that needs the
    # reference, and every such trial would then fail on its own, after Ray started.
    with_reference = [o for o in swept_objectives(config) if uses_reference(o)]
    if with_reference and config.dpo.reference == "adapter_disabled" and config.peft.method != "lora":
        raise UserError(f"dpo.reference: adapter_disabled needs peft.method: lora (got {config.peft.method}), and "
                        f"the sweep trains {with_reference[0]}, which compares with the reference; use precompute "
                        "or model")


def needs_precomputed_reference(config: ExperimentConfig) -> bool:
    """True when the sweep's prepared pairs must carry the reference's log-probs: a swept objective compares
    with the reference and dpo.reference is precompute (computed once, in prepare, for every trial)."""
    return config.dpo.reference == "precompute" and any(uses_reference(o) for o in swept_objectives(config))


def check_mix_names(names: list[str], available: list[str], what: str) -> None:
    unknown = sorted(set(names) - set(available))
    if unknown:
        raise UserError(f"sweep.mix: no {what} named {', '.join(unknown)}; the {what}s are {', '.join(available)}")
    unweighted = sorted(set(available) - set(names))
    if unweighted:
        raise UserError(f"sweep.mix: give every {what} a weight (0 leaves it out); missing: {', '.join(unweighted)}")


def check_same_sweep(sweep_dir: str | Path, config_yaml: str) -> None:
    """A sweep directory (a path or a URI) belongs to one config: resuming it under another would mix
    incomparable trials."""
    recorded = storage.join(sweep_dir, SWEEP_CONFIG)
    if storage.is_file(recorded) and storage.read_text(recorded) != config_yaml:
        raise UserError(f"{sweep_dir}: holds a sweep of a different config ({recorded}); delete that directory "
                        "or set another output_dir to start a new sweep")


def is_prepared_for(manifest: dict, config: ExperimentConfig) -> bool:
    """True when the prepared data was made from the same data and model settings (and, for a preference
    sweep, holds pairs with the reference log-probs the swept objectives need, from the same reference)."""
    made = manifest.get("config", {})
    if made.get("data") != config.data.model_dump(mode="json") or \
            made.get("model") != config.model.model_dump(mode="json"):
        return False
    holds_pairs, wants_pairs = manifest.get("kind") == "preference", swept_objectives(config) != ["sft"]
    if holds_pairs != wants_pairs:
        return False
    return not needs_precomputed_reference(config) or (
        manifest.get("reference") == "precompute"
        and made.get("dpo", {}).get("reference_model_path") == config.dpo.reference_model_path)


def max_concurrent_trials(scaling: ScalingConfig, cluster: dict, configured: int | None) -> int:
    """Trials at once: configured, or as many as the cluster holds (workers + one CPU for data and eval each).

    Tune cannot see the resources a trial's Train run asks for, and a Train run waits for them forever, so
    launching more trials than fit only parks their drivers.
    """
    if configured:
        return configured
    per_trial_cpus = scaling.num_workers * scaling.cpus_per_worker + 1
    fits = int(cluster.get("CPU", 0) // per_trial_cpus)
    if scaling.use_gpu:
        fits = min(fits, int(cluster.get("GPU", 0) // (scaling.num_workers * (scaling.gpus_per_worker or 1))))
    return max(1, fits)


def mixing_inputs(config: ExperimentConfig, manifest: dict, data_dir: Path,
                  sweep_dir: Path) -> tuple[Path, dict[str, int]]:
    """(records to mix, records per mixing name): by source from data/filtered, or by domain from its copy."""
    from instune.tune.domains import rekey_by_domain

    mix = config.sweep.mix
    if manifest.get("kind") == "preference":  # the prepared splits themselves, not mixed (check_preference_sweep)
        return data_dir, {name: c["kept"] for name, c in manifest["sources"].items()}
    if mix is None or mix.by == "source":
        return data_dir / "filtered", {name: c["kept"] for name, c in manifest["sources"].items()}
    kept = rekey_by_domain(data_dir / "filtered", sweep_dir / "by_domain")
    check_mix_names(mix_names(config.sweep), sorted(kept), "domain")
    return sweep_dir / "by_domain", kept


def trial_plan(config: ExperimentConfig, tree: dict, eval_sets: list, model_path: str, tokenizer_path: str,
               filtered_dir: Path, kept: dict[str, int], sweep_dir: Path, sweep_uri: str | None = None) -> TrialPlan:
    from instune.eval.evaluate import eval_settings
    from instune.tune.eval_data import tokenize_eval_sets

    sweep, m = config.sweep, config.model
    mix = sweep.mix
    pair_splits = {}
    if swept_objectives(config) != ["sft"]:
        pair_splits = {split: str((filtered_dir / split).resolve()) for split in ("train", "validation")
                       if (filtered_dir / split).is_dir()}
    return TrialPlan(
        base_tree=tree, sweep_dir=str(sweep_dir.resolve()), model_path=model_path, tokenizer_path=tokenizer_path,
        filtered_dir=str(filtered_dir.resolve()), kept=kept, mix_by=mix.by if mix else None,
        mix_names=mix_names(sweep), dirichlet_alpha=mix.dirichlet.alpha if mix and mix.dirichlet else None,
        eval_data=tokenize_eval_sets(eval_sets, tokenizer_path, m.max_length, sweep_dir / "eval_data"),
        set_kinds={s.name: s.kind for s in eval_sets}, objective=sweep.objective,
        report_while_training=sweep.objective.endswith("_loss") or sweep.objective in PAIR_SWEEP_OBJECTIVES,
        eval_sets=eval_sets if sweep.final_eval else [],
        eval_settings=eval_settings(config.model, config.eval),
        sweep_uri=sweep_uri, pair_splits=pair_splits)


def trial_dirname(trial) -> str:
    """Tune's directory for a trial is its id, the same id as `trials/<id>`."""
    return trial.trial_id


def make_tuner(trainable, sweep: SweepConfig, eval_every: int, experiment_dir: Path, concurrency: int,
               experiment_uri: str | None = None):
    """A new Tuner, or the interrupted one restored: finished and failed trials stay, the rest run.
    Tune's state goes to `experiment_uri` when given (a URI output_dir), else to `experiment_dir`."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from instune.tune.results import TrialLines

    if experiment_uri:
        # Tune gets the filesystem itself: the URI's options (region, endpoint) are not part of a path.
        filesystem, experiment_path = storage.resolve(experiment_uri)
        storage_path = experiment_path.rsplit("/", 1)[0]
    else:
        filesystem, experiment_path = None, str(experiment_dir)
        storage_path = str(experiment_dir.parent.resolve())
    if tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem):
        print(f"[sweep] resuming {experiment_uri or experiment_dir}", flush=True)
        return tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False, storage_filesystem=filesystem)
    if sweep.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        # TuneConfig.max_concurrent_trials wraps a Searcher in a ConcurrencyLimiter...
        search_alg, searcher_limit = OptunaSearch(seed=sweep.seed), concurrency
    else:
        # ...but ignores it for the variant generator, which takes the limit itself.
        search_alg, searcher_limit = BasicVariantGenerator(random_state=sweep.seed, max_concurrent=concurrency), None
    scheduler = ASHAScheduler(time_attr="step", max_t=NO_STEP_LIMIT, grace_period=sweep.grace_steps or eval_every,
                              reduction_factor=sweep.reduction_factor) \
        if sweep.scheduler == "asha" else FIFOScheduler()
    num_samples = sweep.num_samples or (1 if sweep.search == "grid" else 8)
    return tune.Tuner(
        trainable,
        param_space=param_space(sweep),
        tune_config=tune.TuneConfig(metric="objective", mode=mode_of(sweep.objective), search_alg=search_alg,
                                    scheduler=scheduler, num_samples=num_samples,
                                    max_concurrent_trials=searcher_limit, trial_dirname_creator=trial_dirname,
                                    # A trial's Train run is driven inside the trial's actor, and Ray Train
                                    # frees the run's placement group only once that actor is dead: a reused
                                    # actor kept an ASHA-stopped trial's CPUs, and the next trial waited forever.
                                    reuse_actors=False),
        run_config=tune.RunConfig(name=experiment_dir.name, storage_path=storage_path,
                                  storage_filesystem=filesystem, callbacks=[TrialLines()], verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
    )


def run_sweep(config: ExperimentConfig, eval_sets: list, manifest: dict, model_path: str, tokenizer_path: str,
              data_dir: Path, sweep_dir: Path, sweep_uri: str | None = None) -> SweepPaths:
    """Run (or resume) the sweep on the connected Ray cluster and write its results into `sweep_dir` (and
    `sweep_uri`, for a URI output_dir); returns where they are."""
    import ray
    from ray import tune

    from instune.atomic import write_text
    from instune.config import config_to_yaml
    from instune.tune.results import write_results

    config_yaml = config_to_yaml(config)
    check_same_sweep(sweep_uri or sweep_dir, config_yaml)
    write_text(sweep_dir / SWEEP_CONFIG, config_yaml)
    if sweep_uri:
        storage.upload_file(sweep_dir / SWEEP_CONFIG, storage.join(sweep_uri, SWEEP_CONFIG))
    tree = config.model_dump(mode="json")
    filtered_dir, kept = mixing_inputs(config, manifest, data_dir, sweep_dir)
    plan = trial_plan(config, tree, eval_sets, model_path, tokenizer_path, filtered_dir, kept, sweep_dir, sweep_uri)

    concurrency = max_concurrent_trials(config.scaling, ray.cluster_resources(), config.sweep.max_concurrent_trials)
    # The trial function mostly waits on its Train run; the CPUs of its data pipeline and eval are budgeted
    # by the concurrency limit above. Tune needs some resource per trial: one byte of Ray's memory resource,
    # not a CPU fraction, which would leave a 2-CPU node 1.99 CPUs, too few for the pipeline's tokenizer
    # actor and a read task at once (the pipeline would wait forever).
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), {"memory": 1})
    # Save Tune's experiment state at most a second after a trial ends, so a killed driver reruns no
    # finished trial (the state is a few kilobytes; the default waits up to minutes on long sweeps).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    experiment_dir = sweep_dir / TUNE_DIR
    t = config.train
    tuner = make_tuner(trainable, config.sweep, t.eval_every or t.log_every, experiment_dir, concurrency,
                       storage.join(sweep_uri, TUNE_DIR) if sweep_uri else None)
    print(f"[sweep] {config.sweep.search} search, {config.sweep.scheduler} scheduler, up to {concurrency} "
          f"trials at once; objective {config.sweep.objective} ({mode_of(config.sweep.objective)})", flush=True)
    results = tuner.fit()
    if not sweep_uri:
        return write_results(results, plan, config.sweep, tree, sweep_dir, experiment_dir)
    # Trials that ended before a restart, perhaps on another machine, left their files in the bucket only.
    storage.download_files(storage.join(sweep_uri, TRIALS_DIR), sweep_dir / TRIALS_DIR,
                           skip=lambda relative: relative.split("/", 1)[-1] not in RESULT_FILES)
    paths = write_results(results, plan, config.sweep, tree, sweep_dir, experiment_dir)
    for local in [paths.results_md, paths.results_csv, paths.best_config, sweep_dir / "plots",
                  sweep_dir / "best_sources"]:
        if local is not None and local.is_file():
            storage.upload_file(local, storage.join(sweep_uri, local.name))
        elif local is not None and local.is_dir():
            storage.upload_files(local, storage.join(sweep_uri, local.name))
    return paths
