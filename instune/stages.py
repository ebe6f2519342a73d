"""The stages as the CLI and the Ray job entrypoints call them: config in, outputs on disk, paths back.

Each function is one stage, read top to bottom; `run_all` chains them. Output layout under `output_dir`:
  resolved_config.yaml   corpus/   base_model/   data/   train/   adapter/   merged/   eval/
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from instune.config import ExperimentConfig, write_resolved_config
from instune.errors import UserError


def start_ray(scaling=None) -> None:
    """Join the cluster named by RAY_ADDRESS (a Ray job), or start a local one.

    A local cluster gets at least one logical CPU more than the training workers reserve: otherwise, on a
    2-core laptop, two 1-CPU workers leave Ray Data no CPU to read their shards with, and the run hangs.
    """
    import ray

    if ray.is_initialized():
        return
    kwargs = {}
    if "RAY_ADDRESS" not in os.environ:
        needed = math.ceil(scaling.num_workers * scaling.cpus_per_worker) + 1 if scaling else 1
        kwargs = {"num_cpus": max(os.cpu_count() or 1, needed), "include_dashboard": False}
    ray.init(log_to_driver=True, **kwargs)
    import ray.data

    # Bars redrawn into a log file are noise; our own one-line progress messages remain.
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()


def output_paths(config: ExperimentConfig) -> dict[str, Path]:
    root = Path(config.output_dir)
    return {name: root / name for name in ("corpus", "base_model", "data", "train", "adapter", "merged", "eval")}


def write_corpus(config: ExperimentConfig) -> None:
    c = config.data.corpus
    if c is None:
        return
    from instune.default.corpus import generate_corpus

    generate_corpus(c.dir, c.in_domain, c.out_of_domain, c.train_per_domain, c.eval_per_domain, c.seed)


def base_model(config: ExperimentConfig) -> tuple[str, str]:
    from instune.base_model import resolve_base_model

    return resolve_base_model(config.model, config.output_dir)


def check_inputs(config: ExperimentConfig) -> None:
    """Everything that can be checked before Ray starts: paths exist, files parse as configs say."""
    from instune.data.prepare import plan_sources

    write_corpus(config)
    plan_sources(config.data.sources)
    for s in config.eval.sets:
        from instune.data.read import expand_paths

        expand_paths(f"eval.sets[{s.name}]", s.path)


def prepare_stage(config: ExperimentConfig) -> dict:
    from instune.data.prepare import prepare

    check_inputs(config)
    _, tokenizer_path = base_model(config)
    write_resolved_config(config, config.output_dir)
    eval_texts = []
    if config.data.filters.decontaminate is not None:
        from instune.eval.evaluate import split_prompt

        eval_texts = ["\n".join(m["content"] for m in split_prompt(r["messages"])[0])
                      for s in load_eval_sets(config) for r in s.records]
    start_ray(config.scaling)
    manifest = prepare(config, tokenizer_path, output_paths(config)["data"], eval_texts)
    for name, c in manifest["sources"].items():
        print(f"[prepare] {name}: read {c['read']} kept {c['kept']} rejected {c['rejected']}")
    return manifest


def train_stage(config: ExperimentConfig):
    """Train on the prepared data; returns TrainOutputs."""
    import ray.data

    from instune.data.prepare import load_manifest
    from instune.train.trainer import TrainOutputs, export_model, loop_settings, run_ray_training, steps_for

    paths = output_paths(config)
    manifest = load_manifest(paths["data"])
    model_path, tokenizer_path = base_model(config)
    write_resolved_config(config, config.output_dir)
    s, t = config.scaling, config.train
    total_steps = steps_for(manifest["splits"]["train"]["rows"], s.num_workers, t.micro_batch_size,
                            t.grad_accum, t.epochs, t.max_steps)
    settings = loop_settings(config, model_path, total_steps)
    start_ray(config.scaling)
    datasets = {"train": ray.data.read_parquet(str(paths["data"] / "train"))}
    if "validation" in manifest["splits"]:
        datasets["validation"] = ray.data.read_parquet(str(paths["data"] / "validation"))
        settings.eval_every = t.log_every
    print(f"[train] {config.peft.method} on {s.num_workers} workers, {total_steps} steps", flush=True)
    result, metrics_file = run_ray_training(
        settings, datasets, num_workers=s.num_workers, use_gpu=s.use_gpu, cpus_per_worker=s.cpus_per_worker,
        gpus_per_worker=s.gpus_per_worker, placement_strategy=s.placement_strategy,
        storage_dir=paths["train"], run_name="run")
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint; see {paths['train']}")
    with result.checkpoint.as_directory() as checkpoint_dir:
        adapter_dir, merged_dir = export_model(Path(checkpoint_dir), model_path, tokenizer_path,
                                               config.peft.method, Path(config.output_dir))
    return TrainOutputs(adapter_dir, merged_dir, metrics_file, dict(result.metrics or {}))


def load_eval_sets(config: ExperimentConfig):
    """Canonical records of every configured eval set (rejects are reported, not fatal)."""
    from instune.data.formats import to_canonical
    from instune.data.read import expand_paths, iter_raw_records
    from instune.eval.evaluate import EvalSet

    sets = []
    for s in config.eval.sets:
        records = []
        for f in expand_paths(f"eval.sets[{s.name}]", s.path):
            for kind, value in to_canonical(iter_raw_records(f, config.data.max_record_bytes), s.name,
                                            s.domain, s.format, s.field_map, f):
                if kind == "kept":
                    records.append(value)
        if config.eval.max_examples:
            records = records[: config.eval.max_examples]
        if not records:
            raise UserError(f"eval.sets[{s.name}]: no usable records in {s.path}")
        sets.append(EvalSet(s.name, s.domain, s.kind, records))
    return sets


def eval_stage(config: ExperimentConfig, model_path: str, label: str) -> list:
    from instune.atomic import write_json
    from instune.eval.evaluate import evaluate_model

    sets = load_eval_sets(config)
    print(f"[eval] {label}: {sum(len(s.records) for s in sets)} examples in {len(sets)} sets", flush=True)
    results = evaluate_model(model_path, sets, max_length=config.model.max_length,
                             max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size)
    write_json(output_paths(config)["eval"] / f"{label}.json", [r.to_dict() for r in results])
    return results


def run_all(config: ExperimentConfig) -> dict:
    """prepare -> eval base -> train -> eval tuned -> before/after table."""
    from instune.eval.compare import before_after_table

    check_inputs(config)
    manifest = prepare_stage(config)
    model_path, _ = base_model(config)
    before = eval_stage(config, model_path, "base") if config.eval.sets else []
    outputs = train_stage(config)
    after = eval_stage(config, str(outputs.merged_dir), "tuned") if config.eval.sets else []
    table = before_after_table(before, after)
    from instune.atomic import write_text

    write_text(output_paths(config)["eval"] / "before_after.md", table + "\n")
    print()
    print(table)
    print()
    print("wrote:")
    for name, path in [("config", Path(config.output_dir) / "resolved_config.yaml"),
                       ("data", output_paths(config)["data"]), ("adapter", outputs.adapter_dir),
                       ("merged model", outputs.merged_dir), ("metrics", outputs.metrics_file),
                       ("eval", output_paths(config)["eval"])]:
        print(f"  {name:13s} {path}")
    return {"manifest": manifest, "before": before, "after": after, "outputs": outputs, "table": table}
