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
from dataclasses import dataclass
from pathlib import Path

from instune.errors import UserError
from instune.train.export import export_model  # noqa: F401  (the driver's export step lives beside it)
from instune.train.loop import LoopSettings, run_training
from instune.train.methods import MethodSettings

POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
DEFAULT_POLL_INTERVAL_S = "0.1"

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


@dataclass
class TrainOutputs:
    adapter_dir: Path  # what was trained: a PEFT adapter, BitFit's biases, or the full model
    merged_dir: Path | None  # a full HF model directory; None for prefix/prompt tuning (nothing to merge)
    metrics_file: Path
    final_metrics: dict


def loop_settings(config, model_path: str, total_steps: int) -> LoopSettings:
    """Plain per-worker settings from the validated config."""
    t, p, m, s = config.train, config.peft, config.model, config.strategy
    return LoopSettings(
        model_path=model_path,
        total_steps=total_steps,
        method=MethodSettings(method=p.method, r=p.r, alpha=p.alpha, dropout=p.dropout,
                              target_modules=p.target_modules, use_rslora=p.use_rslora, use_dora=p.use_dora,
                              modules_to_save=list(p.modules_to_save), num_virtual_tokens=p.num_virtual_tokens,
                              lisa_layers=p.lisa_layers, lisa_period=p.lisa_period),
        lr=t.lr, weight_decay=t.weight_decay, warmup_ratio=t.warmup_ratio, max_grad_norm=t.max_grad_norm,
        optimizer=t.optimizer, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum, seed=t.seed,
        log_every=t.log_every, eval_every=t.eval_every or t.log_every, checkpoint_every=t.checkpoint_every,
        dtype=m.dtype, attn_implementation=m.attn_implementation,
        gradient_checkpointing=m.gradient_checkpointing, use_gpu=config.scaling.use_gpu,
        head_dropout=t.head_dropout, strategy=s.name, zero_stage=s.zero_stage,
        offload_optimizer=s.offload_optimizer, offload_params=s.offload_params, deepspeed=dict(s.deepspeed),
    )


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


def make_metrics_callback(metrics_file: Path, total_steps: int, tensorboard_dir: Path | None = None):
    """A Ray Train callback (runs in the controller) that appends metrics to `metrics_file`, writes them to
    TensorBoard under `tensorboard_dir`, and prints one progress line."""
    import ray.train

    class MetricsToFile(ray.train.UserCallback):
        def __init__(self):
            self.start = time.time()
            self.writer = None

        def after_report(self, run_context, metrics, checkpoint):
            m = dict(metrics[0])
            m["time_s"] = round(time.time() - self.start, 2)
            with open(metrics_file, "a") as f:
                f.write(json.dumps(m) + "\n")
            if tensorboard_dir is not None:
                if self.writer is None:
                    from tensorboardX import SummaryWriter

                    self.writer = SummaryWriter(str(tensorboard_dir))
                for name, value in m.items():
                    if name != "step" and isinstance(value, (int, float)):
                        self.writer.add_scalar(name, value, m["step"])
                self.writer.flush()
            extra = f" eval_loss {m['eval_loss']:.4f}" if "eval_loss" in m else ""
            print(f"[train] step {m['step']}/{total_steps} loss {m['loss']:.4f}{extra} "
                  f"lr {m['lr']:.2e} tok/s {m['tokens_per_second']:.0f}", flush=True)

    return MetricsToFile()


def run_ray_training(settings: LoopSettings, datasets: dict, *, num_workers: int, use_gpu: bool,
                     cpus_per_worker: float, gpus_per_worker: float, placement_strategy: str,
                     storage_dir: Path, run_name: str, max_failures: int = 0, callbacks: tuple = (),
                     keep_checkpoints: int = 2, storage_uri: str | None = None):
    """Run TorchTrainer on the given Ray Datasets; returns (Ray's Result, the metrics file).

    `callbacks`: more Ray Train UserCallbacks (a sweep's report to Tune). Checkpoints kept: the
    `keep_checkpoints` best by eval_loss when there is validation data, else the latest (Ray always keeps
    the latest too, for resume). `storage_uri`: a cloud URI that is Ray Train's storage path instead of
    `storage_dir`; metrics are still written under `storage_dir/run_name` as the run goes, and copied beside
    the checkpoints when it ends. Raises UserError, before any worker starts, when the cluster cannot place
    the workers or the run directory holds checkpoints this run cannot resume from.
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
            callbacks=[make_metrics_callback(metrics_file, settings.total_steps, run_dir / TENSORBOARD_DIR),
                       *callbacks],
        ),
        datasets=datasets,
    )
    try:
        return trainer.fit(), metrics_file
    finally:
        if remote_run_dir:
            storage.upload_files(run_dir, remote_run_dir)  # metrics.jsonl and tensorboard/
