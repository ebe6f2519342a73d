"""Driver side of training: turn the config into a Ray Train TorchTrainer run, then export the result.

The per-worker loop is `loop.run_training`; Ray adds scale around it (ScalingConfig, dataset shards,
checkpoints to `storage_path`, FailureConfig restarts) rather than inside it.

Resume: Ray Train V2 keeps a snapshot of the reported checkpoints in `storage_path/name`. A worker that dies
is replaced and the group restarts from the latest checkpoint (up to `max_failures` times); a run started
again with the same storage path and name (the same output_dir) restores that snapshot and continues from
its latest checkpoint, so an interrupted `instune train` is resumed by running it again. The storage path may
be a cloud URI (s3://, gs://): Ray Train then uploads checkpoints there and restores from there, on any machine.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from instune.config import ExperimentConfig, config_to_yaml, settings_from
from instune.errors import UserError
from instune.train.export import export_model
from instune.train.loop import LoopSettings, run_training
from instune.train.methods import MethodSettings
from instune.train.preference_loss import PreferenceSettings
from instune.train.trackers import TENSORBOARD_DIR, Tracking  # noqa: F401  (TENSORBOARD_DIR: where runs write it)

POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
DEFAULT_POLL_INTERVAL_S = "0.1"

METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainOutputs:
    adapter_dir: Path  # what was trained: a PEFT adapter, BitFit's biases, or the full model
    merged_dir: Path | None  # a full HF model directory; None for prefix/prompt tuning (nothing to merge)
    metrics_file: Path
    final_metrics: dict


@dataclass
class WorkerSettings:
    """How Ray Train runs the loop: run_ray_training's keyword arguments that come from the config."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0
    placement_strategy: str = "PACK"
    max_failures: int = 0
    keep_checkpoints: int = 2


@dataclass
class TrainingRun:
    """One Ray Train run of the loop, as `training_run` builds it from the config."""

    loop: LoopSettings
    workers: WorkerSettings
    tracking: Tracking = field(default_factory=Tracking)
    # data.outcome_markers' fields when the data carried them: export records them beside the model.
    outcome_markers: dict | None = None


# The config sections a training run is built from (peft builds the loop's MethodSettings), and the fields of
# them that the settings take under another name.
RUN_SECTIONS = ("model", "train", "strategy", "scaling")
RENAMED = {"strategy.name": "strategy"}
# Fields of those sections (and of peft) that reach neither LoopSettings, MethodSettings nor WorkerSettings,
# and where each goes instead. A new field must be in the settings or here (tests/train/test_run_settings.py).
NOT_IN_RUN_SETTINGS = {
    "model.path": "resolved by base_model into the loop's model_path",
    "model.tokenizer_path": "the data stage tokenizes with it; export copies it beside the model",
    "model.chat_template": "base_model writes it into the tokenizer every stage loads",
    "model.embedded": "base_model builds the embedded model from it",
    "model.max_length": "the data stage packs or cuts rows to it; the loop takes rows as they come",
    "train.epochs": "steps_for turns it into the loop's total_steps",
    "train.max_steps": "steps_for turns it into the loop's total_steps",
    "train.report_to": "training_run puts it in the run's Tracking, which the metrics callback reports to",
    "scaling.resource_wait_s": "start_ray watches the placement groups' wait with it (instune/ray_runtime.py)",
}


def training_run(config: ExperimentConfig, model_path: str, rows: int,
                 eval_datasets: list[str] | tuple[str, ...] = (), run_name: str | None = None) -> TrainingRun:
    """The loop's and Ray Train's settings for training `model_path` on `rows` training rows (0 when unknown
    before training: then train.max_steps must be set). The one path from config to training, for `instune
    train` and for each sweep trial; `eval_datasets`: more datasets whose loss is reported by name;
    `run_name`: the trackers' run name (default the config's name; a sweep trial's adds its trial id)."""
    t, s = config.train, config.scaling
    total_steps = steps_for(rows, s.num_workers, t.micro_batch_size, t.grad_accum, t.epochs, t.max_steps)
    sections = {name: getattr(config, name) for name in RUN_SECTIONS}
    method = settings_from(MethodSettings, {"peft": config.peft})
    preference = settings_from(PreferenceSettings, {"dpo": config.dpo})
    loop = settings_from(LoopSettings, sections, RENAMED, model_path=model_path, total_steps=total_steps,
                         method=method, eval_every=t.eval_every or t.log_every, eval_datasets=list(eval_datasets),
                         preference=preference)
    tracking = Tracking(report_to=list(t.report_to), name=run_name or config.name,
                        config=config.model_dump(mode="json"),
                        attachments={"resolved_config.yaml": config_to_yaml(config)})
    markers = config.data.outcome_markers
    return TrainingRun(loop, settings_from(WorkerSettings, sections, RENAMED), tracking,
                       markers.model_dump() if markers else None)


def steps_for(rows: int, num_workers: int, micro_batch_size: int, grad_accum: int, epochs: int,
              max_steps: int | None) -> int:
    """Optimizer steps: `max_steps` if set, else full passes over the rows each worker gets."""
    per_step = num_workers * micro_batch_size * grad_accum
    steps_per_epoch = rows // per_step
    if max_steps is None and steps_per_epoch == 0:
        raise UserError(f"train.micro_batch_size: {rows} training rows cannot fill one step of "
                        f"{num_workers} workers x {micro_batch_size} rows x {grad_accum} accumulation")
    return max_steps or steps_per_epoch * epochs


def ray_worker_entry(settings: dict) -> None:
    from instune.train.sessions import RaySession

    run_training(LoopSettings.from_dict(settings), RaySession())


def make_metrics_callback(metrics_file: Path, total_steps: int, tracking: Tracking | None = None):
    """A Ray Train callback (runs in the controller) that appends metrics to `metrics_file`, reports them to
    the trackers of `tracking` (default: TensorBoard) beside it, and prints one progress line.

    Ray Train calls a callback at reports and failures only, so the trackers are opened at the first report
    and closed at the last step or at a failure."""
    import ray.train

    from instune.progress import rate_and_eta
    from instune.train.trackers import open_trackers

    tracking = tracking or Tracking()

    class MetricsToFile(ray.train.UserCallback):
        def __init__(self):
            self.start = time.time()
            self.first_report: tuple[float, int] | None = None  # the ETA's rate is over steps since then
            self.trackers = None

        def after_report(self, run_context, metrics, checkpoint):
            m = dict(metrics[0])
            m["time_s"] = round(time.time() - self.start, 2)
            with open(metrics_file, "a") as f:
                f.write(json.dumps(m) + "\n")
            if self.trackers is None:
                self.trackers = open_trackers(tracking, metrics_file.parent)
            for tracker in self.trackers:
                tracker.log(m, m["step"])
            if m["step"] >= total_steps:
                self.close(failed=False)
            extra = f" eval_loss {m['eval_loss']:.4f}" if "eval_loss" in m else ""
            self.first_report = self.first_report or (time.monotonic(), m["step"])
            _, eta = rate_and_eta(m["step"], total_steps, self.first_report, time.monotonic())
            print(f"[train] step {m['step']}/{total_steps} loss {m['loss']:.4f}{extra} "
                  f"lr {m['lr']:.2e} tok/s {m['tokens_per_second']:.0f} {eta}", flush=True)

        def after_exception(self, run_context, worker_exceptions):
            # A restart (max_failures) reports again and reopens them; the same W&B and MLflow run resumes.
            self.close(failed=True)

        def close(self, failed: bool) -> None:
            for tracker in self.trackers or []:
                tracker.close(failed)
            self.trackers = None

    return MetricsToFile()


def run_ray_training(settings: LoopSettings, datasets: dict, *, num_workers: int, use_gpu: bool,
                     cpus_per_worker: float, gpus_per_worker: float, placement_strategy: str,
                     storage_dir: Path, run_name: str, max_failures: int = 0, callbacks: tuple = (),
                     keep_checkpoints: int = 2, storage_uri: str | None = None, tracking: Tracking | None = None):
    """Run TorchTrainer on the given Ray Datasets; returns (Ray's Result, the metrics file).

    `callbacks`: more Ray Train UserCallbacks (a sweep's report to Tune). Checkpoints kept: the
    `keep_checkpoints` best by eval_loss when there is validation data, else the latest (Ray always keeps
    the latest too, for resume). `storage_uri`: a cloud URI that is Ray Train's storage path instead of
    `storage_dir`; metrics are still written under `storage_dir/run_name` as the run goes, and copied beside
    the checkpoints when it ends. `tracking`: the trackers (train.report_to) and attachments; default TensorBoard
    alone. Raises UserError, before any worker starts, when the cluster cannot place the workers or the run
    directory holds checkpoints this run cannot resume from.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from instune import storage
    from instune.train.checks import check_cluster_fits, check_resume_dir

    check_cluster_fits(num_workers, cpus_per_worker, gpus_per_worker, use_gpu)
    run_dir = storage_dir / run_name
    remote_run_dir = storage.join(storage_uri, run_name) if storage_uri else None
    check_resume_dir(remote_run_dir or run_dir, settings.method, settings.strategy, num_workers)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_file = run_dir / METRICS_FILE
    if remote_run_dir and not metrics_file.exists() and storage.is_file(storage.join(remote_run_dir, METRICS_FILE)):
        # Resumed on another machine: the metrics of the steps before go on in the same file.
        metrics_file.write_bytes(storage.read_bytes(storage.join(remote_run_dir, METRICS_FILE)))
    # Ray Train V2's controller takes one report off a worker's queue (of size 1) per poll of the workers,
    # every 2 s by default, and the worker's next ray.train.report blocks until then: a loop that logs more
    # often than every 2 s runs at the poll's pace (bench/train_throughput.py: 2.6 steps/s through Ray against
    # 6.1 bare, logging every 5 steps). The controller reads this from the driver's environment.
    os.environ.setdefault(POLL_INTERVAL_ENV, DEFAULT_POLL_INTERVAL_S)
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus_per_worker or 1
    scored = "validation" in datasets and bool(settings.eval_every)
    trainer = TorchTrainer(
        ray_worker_entry,
        train_loop_config=settings.to_dict(),
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=placement_strategy),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_uri or str(storage_dir.resolve()),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=keep_checkpoints,
                checkpoint_score_attribute="eval_loss" if scored else None,
                checkpoint_score_order="min"),
            callbacks=[make_metrics_callback(metrics_file, settings.total_steps, tracking),
                       *callbacks],
        ),
        datasets=datasets,
    )
    try:
        return trainer.fit(), metrics_file
    finally:
        if remote_run_dir:
            storage.upload_files(run_dir, remote_run_dir)  # metrics.jsonl and tensorboard/


def train_and_export(run: TrainingRun, datasets: dict, tokenizer_path: str, *, storage_dir: Path,
                     export_dir: Path, storage_uri: str | None = None, callbacks: tuple = ()) -> TrainOutputs:
    """Run `run` on Ray Train (resuming from `storage_dir/run`, or `storage_uri/run`) and export its best
    checkpoint under `export_dir` (adapter/ and merged/)."""
    result, metrics_file = run_ray_training(run.loop, datasets, storage_dir=storage_dir, run_name="run",
                                            callbacks=callbacks, storage_uri=storage_uri, tracking=run.tracking,
                                            **asdict(run.workers))
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint; see {storage_uri or storage_dir}")
    with result.checkpoint.as_directory() as checkpoint_dir:
        adapter_dir, merged_dir = export_model(Path(checkpoint_dir), run.loop.model_path, tokenizer_path,
                                               run.loop.method.method, export_dir, run.outcome_markers)
    return TrainOutputs(adapter_dir, merged_dir, metrics_file, dict(result.metrics or {}))
