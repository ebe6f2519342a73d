"""One sweep trial, as Ray Tune runs it: read top to bottom.

  1. the base config with the trial's sampled values, validated (a bad value fails this trial only);
  2. a mixture drawn with the trial's weights from the records prepared once for the sweep (a preference
     sweep: the prepared pairs, with their reference log-probs, as they are);
  3. one Ray Train run (the Train V2 way inside Tune: this function builds and fits a TorchTrainer), whose
     reports carry the loss on every eval set and reach Tune through `ReportToTune`;
  4. the trained model exported, scored by exact match on every eval set, and reported once more.
Outputs live in `<sweep>/trials/<trial id>/`: trial.json (values), train/ (Ray Train run, metrics.jsonl),
adapter/, and final.json when the trial finished or error.txt when it failed. With a URI output_dir the Train
run keeps its checkpoints in `<sweep URI>/trials/<trial id>/train/`, and the trial's files are copied beside
it when the trial ends.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ray.tune.integration.ray_train import TuneReportCallback

from instune import storage
from instune.atomic import write_json, write_text
from instune.tune.objective import with_objective
from instune.tune.space import apply_overrides, mix_weights, param_overrides, source_weight_overrides

if TYPE_CHECKING:
    from instune.config import ExperimentConfig

TRIALS_DIR = "trials"
TRIAL_FILE = "trial.json"
FINAL_FILE = "final.json"
ERROR_FILE = "error.txt"
# Tune's sampled values, written before anything can fail: a restored sweep knows an errored trial's config
# only from here (Tune keeps it in the trial's last result, which a trial that never reported lacks).
SAMPLED_FILE = "sampled.json"
METRICS_FILE = "train/run/metrics.jsonl"
# What the sweep's results are made of (results.py), relative to a trial's directory.
RESULT_FILES = (TRIAL_FILE, FINAL_FILE, ERROR_FILE, SAMPLED_FILE, METRICS_FILE)


@dataclass
class TrialPlan:
    """What every trial shares, fixed when the sweep starts; plain values that Tune ships to each trial."""

    base_tree: dict  # the validated base config, defaults filled in
    sweep_dir: str
    model_path: str
    tokenizer_path: str
    filtered_dir: str  # the records to mix: data/filtered, or its copy keyed by domain
    kept: dict[str, int]  # records per mixing name (source or domain)
    mix_by: str | None  # "source", "domain", or None for the base config's own source weights
    mix_names: list[str]
    dirichlet_alpha: float | None
    eval_data: dict[str, str]  # eval set -> its tokenized rows, for loss while training
    set_kinds: dict[str, str]  # eval set -> "in_domain" or "out_of_domain"
    objective: str
    report_while_training: bool  # loss objectives: every report goes to Tune (ASHA acts on them)
    eval_sets: list = field(default_factory=list)  # EvalSets for exact match at the end; [] skips it
    eval_settings: object = None  # instune.eval.evaluate.EvalSettings
    sweep_uri: str | None = None  # a URI output_dir's sweep/: trials' Train runs and files go there too
    pair_splits: dict[str, str] = field(default_factory=dict)  # a preference sweep: split -> its prepared pairs


class ReportToTune(TuneReportCallback):
    """Ray Train callback (in the trial's Train controller): each report, with its scores, becomes a Tune result."""

    def __init__(self, set_kinds: dict[str, str], objective: str):
        super().__init__()
        self.set_kinds, self.objective = set_kinds, objective

    def after_report(self, run_context, metrics, checkpoint):
        scored = with_objective(metrics[0], self.set_kinds, self.objective)
        # Reports between evals (train.eval_every above log_every) carry no eval loss, so no objective:
        # Tune requires the metric in every result, and a scheduler has nothing to compare in them.
        if "objective" in scored:
            super().after_report(run_context, [scored, *metrics[1:]], checkpoint)


def trial_run_name(name: str, trial_id: str) -> str:
    """A trial's run name in the trackers: the experiment's name and the Tune trial id (its directory's name)."""
    return f"{name}-{trial_id}"


def trial_dir_of(sweep_dir: str | Path, trial_id: str) -> Path:
    return Path(sweep_dir) / TRIALS_DIR / trial_id


def run_trial(sampled: dict, plan: TrialPlan) -> None:
    """The Tune function trainable; `sampled` is Tune's config (dotted paths and "mix.<name>" weights)."""
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    trial_dir = trial_dir_of(plan.sweep_dir, trial_id)
    trial_uri = storage.join(plan.sweep_uri, TRIALS_DIR, trial_id) if plan.sweep_uri else None
    # A trial Tune restarts after the driver died starts over: no half-written outputs of the first attempt,
    # and no Train run in the bucket that its new run would resume.
    shutil.rmtree(trial_dir, ignore_errors=True)
    if trial_uri:
        storage.delete_dir(trial_uri)
    trial_dir.mkdir(parents=True)
    write_json(trial_dir / SAMPLED_FILE, sampled)
    try:
        final = train_and_evaluate(sampled, plan, trial_dir, trial_uri)
    except Exception as e:
        write_text(trial_dir / ERROR_FILE, f"{type(e).__name__}: {e}\n")
        if trial_uri:
            storage.upload_files(trial_dir, trial_uri)
        raise
    write_json(trial_dir / FINAL_FILE, final)
    if trial_uri:
        storage.upload_files(trial_dir, trial_uri)
    ray.tune.report(final)


def trial_config(sampled: dict, plan: TrialPlan) -> tuple[ExperimentConfig, dict[str, float], dict]:
    """(validated config, mix weights by name, the overrides applied)."""
    from instune.config import validate_config

    overrides = param_overrides(sampled)
    if plan.mix_by is None:
        weights = {s["name"]: s["weight"] for s in plan.base_tree["data"]["sources"]}
    else:
        weights = mix_weights(sampled, plan.mix_names, plan.dirichlet_alpha)
    if plan.mix_by == "source":
        overrides.update(source_weight_overrides(plan.base_tree, weights))
    tree = apply_overrides(plan.base_tree, overrides)
    # The trial's tokenizer (plan.tokenizer_path) already carries model.chat_template; the trial runs in its
    # own directory (Tune's chdir), perhaps on another node, where a relative or local .jinja path is not there.
    tree["model"]["chat_template"] = None
    config = validate_config(tree, "sweep trial config")
    return config, weights, overrides


def trial_datasets(config: ExperimentConfig, plan: TrialPlan, weights: dict[str, float]) -> dict:
    """The trial's mixture (train, and validation when configured) and the eval sets, as Ray Datasets. A
    preference trial takes the pairs prepared once for the sweep instead (train, and validation: the held-out
    pairs its reward accuracy is measured on)."""
    import pyarrow.parquet as pq
    import ray.data

    from instune.data.raydata import read_parquet
    from instune.data.splits import mix_tokenize_pack, phase2_arguments

    d = config.data
    ray.data.DataContext.get_current().enable_progress_bars = False
    if plan.pair_splits:
        datasets = {split: read_parquet(path).materialize() for split, path in plan.pair_splits.items()}
    else:
        # Everything but the mixture (outcome markers, packing, truncation, validation split) as `prepare` would
        # do it from this trial's config. Without a target size a mixture keeps each record once and weights
        # only switch sources on or off; a swept mix is drawn at the size of the prepared data instead, so every
        # trial trains on as many records.
        arguments = phase2_arguments(config, plan.tokenizer_path)
        arguments.update(weights=weights, size=d.mix_size or (sum(plan.kept.values()) if plan.mix_by else None))
        train, validation, _ = mix_tokenize_pack(Path(plan.filtered_dir), plan.kept, **arguments)
        # Materialised before training starts, so the trial's data pipeline is done before its workers hold CPUs.
        datasets = {"train": train.materialize()}
        if validation is not None:
            datasets["validation"] = validation.materialize()
    for name, path in plan.eval_data.items():
        datasets[name] = ray.data.from_arrow(pq.read_table(path))
    return datasets


def train_and_evaluate(sampled: dict, plan: TrialPlan, trial_dir: Path, trial_uri: str | None = None) -> dict:
    """Steps 1-4 of the module docstring; returns the final metrics. `trial_uri`: where the Train run keeps its
    checkpoints instead of `trial_dir/train` (a URI output_dir)."""
    from instune.train.trainer import train_and_export, training_run

    config, weights, overrides = trial_config(sampled, plan)
    write_json(trial_dir / TRIAL_FILE, {"overrides": overrides, "mix": weights, "mix_by": plan.mix_by})
    datasets = trial_datasets(config, plan, weights)

    # The same run as `instune train`, max_failures and keep_checkpoints included: a worker lost inside a
    # trial restarts from the trial's own latest checkpoint, which is what a user who set them asked for.
    # Each trial its own tracker run name (W&B, MLflow), so trials are told apart there as in the trial table.
    run = training_run(config, plan.model_path, datasets["train"].count(), eval_datasets=list(plan.eval_data),
                       run_name=trial_run_name(config.name, trial_dir.name))
    callbacks = (ReportToTune(plan.set_kinds, plan.objective),) if plan.report_while_training else ()
    print(f"[sweep] trial {trial_dir.name}: {overrides} mix {weights}, {run.loop.total_steps} steps", flush=True)
    outputs = train_and_export(run, datasets, plan.tokenizer_path, storage_dir=trial_dir / "train",
                               export_dir=trial_dir, callbacks=callbacks,
                               storage_uri=storage.join(trial_uri, "train") if trial_uri else None)

    final = dict(outputs.final_metrics, finished=True, total_steps=run.loop.total_steps)
    final.update({f"mix/{name}": w for name, w in weights.items()})
    if plan.eval_sets:
        from instune.eval.evaluate import evaluate_in_process

        # Methods with nothing to merge (prompt tuning) are evaluated as an adapter on the base model.
        model_dir, base_path = (outputs.merged_dir, None) if outputs.merged_dir is not None else \
            (outputs.adapter_dir, plan.model_path)
        results, _ = evaluate_in_process(str(model_dir), plan.eval_sets, plan.eval_settings,
                                         base_model_path=base_path)
        final.update({f"accuracy/{r.name}": r.exact_match for r in results})
    # The adapter stays; a merged full copy per trial would fill the disk, and the best config retrains anyway.
    if outputs.merged_dir is not None:
        shutil.rmtree(outputs.merged_dir, ignore_errors=True)
    return with_objective(final, plan.set_kinds, plan.objective)
