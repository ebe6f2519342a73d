"""The stages as the CLI and the Ray job entrypoints call them: config in, outputs on disk, paths back.

Each function is one stage, read top to bottom; `run_all` chains them. Output layout under `output_dir`:
  resolved_config.yaml   corpus/   base_model/   data/   train/   adapter/   merged/   eval/

`output_dir` may be a cloud URI (s3://, gs://). Stages then write into a local scratch directory (`work_dir`)
and `publish` each finished output to the URI, which readers use: training reads the prepared splits from it
with Ray Data, and Ray Train keeps its checkpoints there (instune/storage.py says how a reader knows an output
is complete). The base model stays in the scratch directory.
"""

from __future__ import annotations

from pathlib import Path

from instune import storage
from instune.config import ExperimentConfig, write_resolved_config
from instune.errors import UserError
from instune.ray_runtime import start_ray


def work_dir(config: ExperimentConfig) -> Path:
    """Where stages write: `output_dir` itself, or for a URI the local scratch directory published from."""
    if not storage.is_uri(config.output_dir):
        return Path(config.output_dir)
    return Path(config.scratch_dir) if config.scratch_dir else \
        storage.default_scratch_dir(config.output_dir, config.name)


def output_paths(config: ExperimentConfig) -> dict[str, Path]:
    """Where each stage writes its output (under work_dir)."""
    root = work_dir(config)
    return {name: root / name for name in ("corpus", "base_model", "data", "train", "adapter", "merged", "eval")}


def published(config: ExperimentConfig, local: Path) -> str:
    """Where readers find `local` (under work_dir): the path itself, or its place under a URI output_dir."""
    if not storage.is_uri(config.output_dir):
        return str(local)
    return storage.join(config.output_dir, *local.relative_to(work_dir(config)).parts)


def publish(config: ExperimentConfig, local: Path, marker: str = storage.SUCCESS) -> str:
    """Upload the finished `local` (a file, or a directory replaced whole with `marker` last) to a URI
    output_dir; nothing to do for a local one. Returns where it is published."""
    location = published(config, local)
    if storage.is_uri(config.output_dir):
        if local.is_dir():
            storage.publish_dir(local, location, marker)
        else:
            storage.upload_file(local, location)
    return location


def local_copy(config: ExperimentConfig, local: Path, marker: str = storage.SUCCESS) -> Path:
    """`local` (under work_dir) holding the published output, downloaded from a URI output_dir unless it does."""
    if storage.is_uri(config.output_dir):
        storage.fetch_dir(published(config, local), local, marker)
    return local


def check_scratch_reachable(config: ExperimentConfig, needs: str) -> None:
    """Raise UserError when a URI output_dir's default scratch directory is on this node only, but the Ray
    cluster has more nodes and the stage's Ray tasks use it (`needs` says how). Without this check, prepare's
    write tasks on other nodes would write to their own disks, and the published data would silently lack
    their files. A configured scratch_dir is taken to be on storage every node mounts."""
    import ray

    if not storage.is_uri(config.output_dir) or config.scratch_dir is not None:
        return
    others = sum(1 for node in ray.nodes() if node["Alive"]) - 1
    if others > 0:
        raise UserError(f"scratch_dir: with output_dir {config.output_dir}, {needs} in the scratch directory "
                        f"{work_dir(config)}, which the {others} other nodes of this Ray cluster cannot see; set "
                        f"scratch_dir to a path every node mounts, or run this stage on one node")


def write_config(config: ExperimentConfig) -> None:
    publish(config, write_resolved_config(config, work_dir(config)))


def write_corpus(config: ExperimentConfig) -> None:
    c = config.data.corpus
    if c is None:
        return
    from instune.default.corpus import generate_corpus

    generate_corpus(c.dir, c.in_domain, c.out_of_domain, c.train_per_domain, c.eval_per_domain, c.seed)
    if config.train.objective != "sft":  # right answers against plausible wrong ones: pairs/train.jsonl
        from instune.default.pairs import write_preference_pairs

        write_preference_pairs(c.dir, c.seed)


def base_model(config: ExperimentConfig) -> tuple[str, str]:
    from instune.base_model import resolve_base_model

    return resolve_base_model(config.model, work_dir(config))


def check_inputs(config: ExperimentConfig) -> None:
    """Everything that can be checked before Ray starts: paths exist, files parse as configs say."""
    from instune.data.sources import plan_sources

    from instune.data.preference_formats import check_sources_kind

    storage.check_output_location(config.output_dir, "output_dir")
    write_corpus(config)
    # Pairs for a preference objective, conversations for sft: a source of the other kind is refused here.
    check_sources_kind(config.data.sources, config.train.objective, config.data.max_record_bytes)
    if config.train.objective == "sft":
        plan_sources(config.data.sources)
    for s in config.eval.sets:
        from instune.data.read import expand_paths

        expand_paths(f"eval.sets[{s.name}]", s.path)


def prepare_stage(config: ExperimentConfig, objectives: list[str] | None = None) -> dict:
    """`instune prepare`; `objectives`: the preference objectives a sweep trains on these pairs (default
    train.objective), so the reference log-probs are computed when any of them needs them."""
    from instune.data.manifest import MANIFEST
    from instune.data.prepare import prepare

    check_inputs(config)
    model_path, tokenizer_path = base_model(config)
    write_config(config)
    eval_texts = []
    if config.data.filters.decontaminate is not None:
        from instune.eval.evaluate import split_prompt

        eval_texts = ["\n".join(m["content"] for m in split_prompt(r["messages"])[0])
                      for s in load_eval_sets(config) for r in s.records]
    start_ray(config.scaling, work_dir(config))
    check_scratch_reachable(config, "prepare's Ray Data tasks write the data")
    if config.train.objective == "sft":
        manifest = prepare(config, tokenizer_path, output_paths(config)["data"], eval_texts, model_path=model_path)
    else:
        from instune.data.prepare_pairs import prepare_pairs

        manifest = prepare_pairs(config, tokenizer_path, output_paths(config)["data"], model_path=model_path,
                                 objectives=objectives)
    # Published with the manifest last: readers (load_manifest) take a prefix without it for unfinished.
    publish(config, output_paths(config)["data"], MANIFEST)
    for name, c in manifest["sources"].items():
        print(f"[prepare] {name}: read {c['read']} kept {c['kept']} rejected {c['rejected']}")
    return manifest


# A prepared split up to this size is read once into Ray's object store; every epoch after the first then
# iterates blocks in memory instead of listing and reading the files again (seconds per epoch on small data).
CACHE_SPLIT_BYTES = 256 * 1024**2


def read_split(split_dir: str | Path):
    """A prepared split (a local path or a URI) as a Ray Dataset: in the object store when small, streamed from
    its files otherwise."""
    from instune.data.raydata import read_parquet

    if storage.is_uri(split_dir):
        # Ray Data gets the filesystem itself: the URI's options (region, endpoint) are not part of a path.
        filesystem, path = storage.resolve(split_dir)
        ds = read_parquet(path, filesystem=filesystem)
    else:
        ds = read_parquet(str(split_dir))
    size = storage.total_size(split_dir, ".parquet")
    return ds.materialize() if size <= CACHE_SPLIT_BYTES else ds


def train_stage(config: ExperimentConfig):
    """Train on the prepared data; returns TrainOutputs."""
    from instune.data.manifest import MANIFEST, load_manifest
    from instune.train.checks import check_training_plan
    from instune.train.trackers import data_report_attachments
    from instune.train.trainer import train_and_export, training_run

    storage.check_output_location(config.output_dir, "output_dir")
    paths = output_paths(config)
    data_dir = published(config, paths["data"])
    manifest = load_manifest(data_dir)
    model_path, tokenizer_path = base_model(config)
    write_config(config)
    if config.data.stream and config.train.max_steps is None:
        raise UserError("train.max_steps: required with data.stream: true (streamed data has no row count "
                        "before training)")
    check_prepared_for_objective(config, manifest, data_dir)
    run = training_run(config, model_path, rows=0 if config.data.stream else manifest["splits"]["train"]["rows"])
    # Pairs are padded rows, never packed, whatever data.pack says.
    check_training_plan(run.loop, packed=config.data.pack and config.train.objective == "sft")
    run.tracking.attachments.update(data_report_attachments(data_dir))
    start_ray(config.scaling, work_dir(config))
    if config.model.path is None:
        check_scratch_reachable(config, "the training workers load the embedded base model")
    if config.data.stream:
        check_scratch_reachable(config, "the training workers read the prepared records (data.stream)")
        from instune.data.splits import stream_train_data

        # Phase 2 (mix, markers, tokenize, pack) runs as training reads; nothing is written. It reads the
        # filtered records from local files, so a URI output_dir's data is downloaded first.
        train, validation = stream_train_data(config, tokenizer_path, local_copy(config, paths["data"], MANIFEST))
        datasets = {"train": train, **({"validation": validation} if validation is not None else {})}
    else:
        datasets = {split: read_split(storage.join(data_dir, split))
                    for split in ("train", "validation") if split in manifest["splits"]}
    print(f"[train] {config.peft.method} on {run.workers.num_workers} workers, {run.loop.total_steps} steps",
          flush=True)
    # The same output_dir resumes from its latest checkpoint (see instune/train/trainer.py).
    outputs = train_and_export(run, datasets, tokenizer_path, storage_dir=paths["train"], export_dir=work_dir(config),
                               storage_uri=published(config, paths["train"]) if storage.is_uri(config.output_dir)
                               else None)
    for exported in (outputs.adapter_dir, outputs.merged_dir):
        if exported is not None:
            publish(config, exported)
    return outputs


def check_prepared_for_objective(config: ExperimentConfig, manifest: dict, data_dir) -> None:
    """UserError, before Ray starts, when the prepared data cannot train train.objective: conversations for a
    preference objective or pairs for sft (the workers would fail on missing columns), or pairs without
    reference log-probs for dpo.reference: precompute."""
    from instune.config import uses_reference

    objective, pairs = config.train.objective, manifest.get("kind") == "preference"
    again = "run `instune prepare` again with this config"
    if pairs != (objective != "sft"):
        held = f"preference pairs (prepared for {manifest.get('objective')})" if pairs else "conversations"
        raise UserError(f"train.objective: {objective}, but {data_dir} holds {held}; {again}")
    if uses_reference(objective) and config.dpo.reference == "precompute" and manifest.get("reference") != "precompute":
        raise UserError(f"dpo.reference: precompute, but the pairs in {data_dir} have no reference log-probs "
                        f"(prepared with reference {manifest.get('reference')}); {again}")


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


def eval_prompt_marker(config: ExperimentConfig):
    """The outcome markers whose success text every eval prompt carries, or None (eval/outcome_marker.py)."""
    from instune.eval.outcome_marker import eval_marker

    markers = config.data.outcome_markers
    return eval_marker(markers.model_dump() if markers else None, config.eval.outcome_marker)


def marker_report_sections(config: ExperimentConfig, with_marker=None, without=None) -> list:
    """The report's note on the eval prompts' outcome marker, and the with/without table when given."""
    from instune.eval.outcome_marker import marker_sections

    return marker_sections(eval_prompt_marker(config), config.data.outcome_markers is not None, with_marker, without)


def prompt_sets(config: ExperimentConfig, with_marker: bool = True):
    """(the eval sets as the model is asked them, the markers whose success text their prompts carry or None)."""
    from instune.eval.outcome_marker import with_success_marker

    sets = load_eval_sets(config)
    markers = eval_prompt_marker(config) if with_marker else None
    return (with_success_marker(sets, markers) if markers is not None else sets), markers


def eval_stage(config: ExperimentConfig, model_path: str, label: str, with_marker: bool = True) -> list:
    """Evaluate a model or adapter directory in a Ray Data actor pool; writes eval/<label>.json and
    eval/<label>_predictions.jsonl and returns the SetResults. The prompts carry the success marker where
    the config asks for it (eval_prompt_marker), unless `with_marker` is False (the ablation)."""
    import json

    from instune.atomic import write_json, write_text
    from instune.eval.evaluate import eval_settings
    from instune.eval.load import is_adapter_dir
    from instune.eval.pool import evaluate_with_ray

    sets, markers = prompt_sets(config, with_marker)
    base_path = base_model(config)[0] if is_adapter_dir(model_path) else None
    # The base model itself is asked with the tokenizer the data was rendered with (model.tokenizer_path,
    # model.chat_template applied), as the tuned model, whose export carries that tokenizer, is.
    tokenizer_path = base_eval_tokenizer(config, model_path)
    e = config.eval
    settings = eval_settings(config.model, e)
    marked = f", prompts with the success marker \"{markers.success}\"" if markers else ""
    print(f"[eval] {label}: {sum(len(s.records) for s in sets)} examples in {len(sets)} sets{marked}", flush=True)
    start_ray(config.scaling, work_dir(config))
    if any(Path(path).resolve().is_relative_to(work_dir(config).resolve()) for path in (model_path, base_path) if path):
        check_scratch_reachable(config, "the eval actors load the model")
    results, predictions = evaluate_with_ray(model_path, sets, settings, num_actors=e.num_actors,
                                             use_gpu=config.scaling.use_gpu, base_model_path=base_path,
                                             tokenizer_path=tokenizer_path)
    eval_dir = output_paths(config)["eval"]
    publish(config, write_json(eval_dir / f"{label}.json", [r.to_dict() for r in results]))
    publish(config, write_text(eval_dir / f"{label}_predictions.jsonl",
                               "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)))
    return results


def base_eval_tokenizer(config: ExperimentConfig, model_path: str) -> str | None:
    """The resolved base tokenizer when `model_path` is the base model and that tokenizer is not the model's own
    (model.tokenizer_path, model.chat_template); None otherwise: a trained model carries its tokenizer."""
    def same(a, b) -> bool:
        return a == b or ("://" not in a and "://" not in b and Path(a).resolve() == Path(b).resolve())

    model, tokenizer = (str(p) for p in base_model(config))
    return tokenizer if same(str(model_path), model) and not same(tokenizer, model) else None


def write_report_for(config: ExperimentConfig, out_dir: Path, title: str, *, data: bool = True,
                     metrics_file: Path | None = None, before=None, after=None, before_label: str = "base",
                     after_label: str = "tuned", first_sections: list | None = None) -> Path:
    """Write out_dir/report.html (self-contained) and report.md: `first_sections`, eval results, learning
    curves from `metrics_file`, the data report when `data`, and the config; returns the HTML path (published
    with the rest when output_dir is a URI)."""
    from instune.config import config_to_yaml
    from instune.report.document import write_report
    from instune.report.sections import run_sections

    sections = run_sections(config_to_yaml(config), data_dir=output_paths(config)["data"] if data else None,
                            metrics_file=metrics_file, before=before, after=after, before_label=before_label,
                            after_label=after_label)
    report = write_report(out_dir, title, (first_sections or []) + sections)
    images = out_dir / f"{report.html.stem}_images"
    for local in ([images] if images.is_dir() else []) + [report.markdown, report.html]:
        publish(config, local)
    return report.html


def eval_report_stage(config: ExperimentConfig, model_path: str | None) -> Path:
    """`instune eval`: evaluate one model or adapter (default: the run's merged model) and write
    eval/report.html; base-model results of an earlier `instune run` (eval/base.json) become the "before"."""
    import json

    from instune.eval.compare import per_set_rows, summary_rows
    from instune.eval.evaluate import SetResult
    from instune.eval.load import check_eval_model, is_adapter_dir
    from instune.report.format import markdown_table

    if not config.eval.sets:
        raise UserError("eval.sets: no eval sets configured; add at least one to evaluate")
    storage.check_output_location(config.output_dir, "output_dir")
    model_path = model_path or str(local_copy(config, output_paths(config)["merged"]))
    model_path = check_eval_model(model_path, base_model(config)[0] if is_adapter_dir(model_path) else None,
                                  "--model")
    results = eval_stage(config, model_path, "eval")
    pair_sections = []
    data_dir = published(config, output_paths(config)["data"])
    if config.train.objective != "sft" and storage.is_file(storage.join(data_dir, "manifest.json")):
        from instune.data.manifest import load_manifest

        pair_sections = preference_before_after(config, load_manifest(data_dir), base_model(config)[0],
                                                None if is_adapter_dir(model_path) else model_path)
    base_file = published(config, output_paths(config)["eval"] / "base.json")
    before = [SetResult.from_dict(d) for d in json.loads(storage.read_text(base_file))] \
        if storage.is_file(base_file) else []
    if sorted((r.name, r.examples) for r in before) != sorted((r.name, r.examples) for r in results):
        before, results = results, None
    report = write_report_for(config, output_paths(config)["eval"], f"{config.name}: eval of {model_path}",
                              data=False, before=before, after=results,
                              before_label="base" if results else "model", after_label="model",
                              first_sections=pair_sections + marker_report_sections(config))
    print(markdown_table(*per_set_rows(before, results)) + "\n\n" + markdown_table(*summary_rows(before, results)))
    print(f"report: {published(config, report)}")
    return report


def preference_before_after(config: ExperimentConfig, manifest: dict, model_path: str, tuned_path: str | None) -> list:
    """For a preference objective with held-out pairs: their scores under the base and the tuned model (a
    model directory; an adapter alone is not scored), printed, written to eval/preference.json and returned as
    report sections; [] otherwise."""
    if config.train.objective == "sft" or tuned_path is None \
            or not manifest["splits"].get("validation", {}).get("rows"):
        return []
    from instune.atomic import write_json
    from instune.eval.preference_eval import before_after, report_sections, summary_line

    validation = local_copy(config, output_paths(config)["data"], "manifest.json") / "validation"
    scores = before_after(model_path, str(tuned_path), validation, config.dpo.beta, config.model.dtype)
    publish(config, write_json(output_paths(config)["eval"] / "preference.json", scores))
    print(summary_line(scores), flush=True)
    return report_sections(scores)


def run_all(config: ExperimentConfig) -> dict:
    """prepare -> eval base -> train -> eval tuned -> before/after table."""
    from instune.eval.compare import per_set_rows, summary_rows

    check_inputs(config)
    manifest = prepare_stage(config)
    model_path, _ = base_model(config)
    before = eval_stage(config, model_path, "base") if config.eval.sets else []
    outputs = train_stage(config)
    # Prefix/prompt tuning has no merged model; eval loads the adapter on the base.
    after = eval_stage(config, str(outputs.merged_dir or outputs.adapter_dir), "tuned") if config.eval.sets else []
    # With the success marker in the prompts, the tuned model once more without it: what the marker is worth.
    without_marker = eval_stage(config, str(outputs.merged_dir or outputs.adapter_dir), "tuned_no_marker",
                                with_marker=False) if config.eval.sets and eval_prompt_marker(config) else None
    from instune.atomic import write_text
    from instune.report.format import markdown_table

    pair_sections = preference_before_after(config, manifest, model_path, outputs.merged_dir)
    table = ""
    if config.eval.sets:
        table = markdown_table(*per_set_rows(before, after)) + "\n\n" + markdown_table(*summary_rows(before, after))
        publish(config, write_text(output_paths(config)["eval"] / "before_after.md", table + "\n"))
    report = write_report_for(config, work_dir(config), f"{config.name}: run",
                              metrics_file=outputs.metrics_file, before=before, after=after,
                              first_sections=pair_sections + (marker_report_sections(config, after, without_marker)
                                                              if config.eval.sets else []))
    print()
    print(table)
    print()
    print("wrote:")
    for name, path in [("config", work_dir(config) / "resolved_config.yaml"),
                       ("data", output_paths(config)["data"]), ("adapter", outputs.adapter_dir),
                       ("merged model", outputs.merged_dir), ("metrics", outputs.metrics_file),
                       ("eval", output_paths(config)["eval"]), ("report", report)]:
        print(f"  {name:13s} {published(config, path) if path is not None else None}")
    return {"manifest": manifest, "before": before, "after": after, "outputs": outputs, "table": table}


def sweep_stage(config: ExperimentConfig):
    """`instune sweep`: prepare the data once (reused while current), then run or resume the sweep of
    `config.sweep` on Ray Tune; returns SweepPaths (results table, best config, plots under output_dir/sweep)."""
    from instune.data.manifest import MANIFEST, load_manifest
    from instune.tune.sweep import check_sweep, is_prepared_for, run_sweep, swept_objectives

    check_sweep(config, config.model_dump(mode="json"))
    check_inputs(config)
    start_ray(config.scaling, work_dir(config), dashboard=True)
    check_scratch_reachable(config, "the sweep's trials read their data and write their files")
    data_dir = output_paths(config)["data"]
    data = published(config, data_dir)
    manifest = load_manifest(data) if storage.is_file(storage.join(data, MANIFEST)) else None
    if manifest is None or not is_prepared_for(manifest, config):
        manifest = prepare_stage(config, objectives=swept_objectives(config))
    else:
        # Trials mix from the local files (data/filtered): a bucket's copy is downloaded unless it is here.
        local_copy(config, data_dir, MANIFEST)
        print(f"[sweep] reusing the prepared data in {data}", flush=True)
    model_path, tokenizer_path = base_model(config)
    eval_sets = load_eval_sets(config)
    sweep_dir = work_dir(config) / "sweep"
    return run_sweep(config, eval_sets, manifest, model_path, tokenizer_path, data_dir, sweep_dir,
                     published(config, sweep_dir) if storage.is_uri(config.output_dir) else None)
