"""Driver side of training: turn the config into a Ray Train TorchTrainer run, then export the result.

The per-worker loop is `loop.run_training`; Ray adds scale around it (ScalingConfig, dataset shards,
checkpoints to `storage_path`, FailureConfig restarts) rather than inside it.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from instune.atomic import atomic_dir
from instune.errors import UserError
from instune.train.loop import MODEL_DIR, LoopSettings, run_training
from instune.train.methods import MethodSettings

METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainOutputs:
    adapter_dir: Path  # what was trained: a PEFT adapter, or the full model for method "full"
    merged_dir: Path  # a full HF model directory transformers loads and generates with
    metrics_file: Path
    final_metrics: dict


def loop_settings(config, model_path: str, total_steps: int) -> LoopSettings:
    """Plain per-worker settings from the validated config."""
    t, p, m = config.train, config.peft, config.model
    return LoopSettings(
        model_path=model_path,
        total_steps=total_steps,
        method=MethodSettings(method=p.method, r=p.r, alpha=p.alpha, dropout=p.dropout,
                              target_modules=p.target_modules, use_rslora=p.use_rslora, use_dora=p.use_dora,
                              modules_to_save=list(p.modules_to_save)),
        lr=t.lr, weight_decay=t.weight_decay, warmup_ratio=t.warmup_ratio, max_grad_norm=t.max_grad_norm,
        micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum, seed=t.seed, log_every=t.log_every,
        dtype=m.dtype, attn_implementation=m.attn_implementation,
        gradient_checkpointing=m.gradient_checkpointing, use_gpu=config.scaling.use_gpu,
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


def make_metrics_callback(metrics_file: Path, total_steps: int):
    """A Ray Train callback (runs in the controller) that appends metrics and prints one progress line."""
    import ray.train

    class MetricsToFile(ray.train.UserCallback):
        def __init__(self):
            self.start = time.time()

        def after_report(self, run_context, metrics, checkpoint):
            m = dict(metrics[0])
            m["time_s"] = round(time.time() - self.start, 2)
            with open(metrics_file, "a") as f:
                f.write(json.dumps(m) + "\n")
            extra = f" eval_loss {m['eval_loss']:.4f}" if "eval_loss" in m else ""
            print(f"[train] step {m['step']}/{total_steps} loss {m['loss']:.4f}{extra} "
                  f"lr {m['lr']:.2e} tok/s {m['tokens_per_second']:.0f}", flush=True)

    return MetricsToFile()


def run_ray_training(settings: LoopSettings, datasets: dict, *, num_workers: int, use_gpu: bool,
                     cpus_per_worker: float, gpus_per_worker: float, placement_strategy: str,
                     storage_dir: Path, run_name: str, max_failures: int = 0):
    """Run TorchTrainer on the given Ray Datasets; returns Ray's Result."""
    import ray.train
    from ray.train.torch import TorchTrainer

    storage_dir.mkdir(parents=True, exist_ok=True)
    metrics_file = storage_dir / run_name / METRICS_FILE
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus_per_worker or 1
    trainer = TorchTrainer(
        ray_worker_entry,
        train_loop_config=settings.to_dict(),
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=placement_strategy),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=str(storage_dir.resolve()),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[make_metrics_callback(metrics_file, settings.total_steps)],
        ),
        datasets=datasets,
    )
    return trainer.fit(), metrics_file


def export_model(checkpoint_dir: Path, base_model_path: str, tokenizer_path: str, method: str,
                 output_dir: Path) -> tuple[Path, Path]:
    """Copy the trained weights out of the checkpoint and write a merged full model; both atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    adapter_dir, merged_dir = output_dir / "adapter", output_dir / "merged"
    with atomic_dir(adapter_dir) as tmp:
        shutil.copytree(checkpoint_dir / MODEL_DIR, tmp, dirs_exist_ok=True)
        tokenizer.save_pretrained(str(tmp))
    if method == "full":
        model = AutoModelForCausalLM.from_pretrained(str(adapter_dir))
    else:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(base_model_path)
        model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    with atomic_dir(merged_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    return adapter_dir, merged_dir
