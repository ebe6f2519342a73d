"""`instune vlm CONFIG [--set KEY=VALUE ...]`: the multimodal experiment, read top to bottom.

Prepare the image-text data on Ray Data (prepare_multimodal.py), evaluate the base model per domain
(generation scores and zero-shot retrieval), train on Ray Train through the per-worker loop, export, and
evaluate again; print the in-domain/out-of-domain table before and after, and write `results.json`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from instune.atomic import write_json
from instune.config import VlmExperimentConfig


def run_vlm(config: VlmExperimentConfig) -> dict:
    """Run every step into `config.output_dir`; return the results (also in results.json). A config with a
    `sweep` section runs the sweep instead (instune/tune/vlm_sweep.py)."""
    if config.sweep is not None:
        from instune.tune.vlm_sweep import run_vlm_sweep

        return run_vlm_sweep(config)
    from instune.ray_runtime import stop_ray
    from instune.report.vlm import write_vlm_report

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = prepare_and_score_base(config, out)
    model_dir, manifest, eval_sets, before = base.model_dir, base.manifest, base.eval_sets, base.before
    in_domain, out_of_domain = base.in_domain, base.out_of_domain
    merged_dir = train(config, model_dir, out)
    after = evaluate_model(str(merged_dir), eval_sets, config)
    results = {"before": before, "after": after, "in_domain": in_domain, "out_of_domain": out_of_domain,
               "gap": {"before": gaps(before, in_domain, out_of_domain),
                       "after": gaps(after, in_domain, out_of_domain)},
               "data": {s: {**{k: c[k] for k in ("read", "kept", "rejected", "tokenized", "dropped")},
                            "rejects": [{k: r[k] for k in ("stage", "reason", "count", "example")}
                                        for r in c["rejects"]]}
                        for s, c in manifest["sources"].items()},
               "model": str(merged_dir)}
    write_json(out / "results.json", results)
    report = write_vlm_report(out, f"{config.name}: vision-language run", results,
                              out / "train" / "run" / "metrics.jsonl", base.resolved_config.read_text())
    print(results_table(results), flush=True)
    print(f"[vlm] wrote {out / 'results.json'} and {report.html}; tuned model: {merged_dir}", flush=True)
    stop_ray()
    return results


@dataclass
class ScoredBase:
    """What the run and every sweep trial start from: the base model, its prepared rows' manifest, the eval sets
    and the base model's scores on them."""

    model_dir: str
    manifest: dict
    eval_sets: list[dict]
    before: dict
    in_domain: list[str]
    out_of_domain: list[str]
    resolved_config: Path


def prepare_and_score_base(config: VlmExperimentConfig, out: Path) -> ScoredBase:
    """Write the resolved config, build or check the base model, start Ray, prepare the image-text rows into
    out/data and score the base model per domain: the steps the run and the sweep share."""
    from instune.config import write_resolved_config
    from instune.data.prepare_multimodal import prepare_multimodal
    from instune.ray_runtime import start_ray

    resolved = write_resolved_config(config, out)
    sources, eval_sources, in_domain, out_of_domain = plan_data(config)
    model_dir = base_model(config, eval_sources)
    start_ray(config.scaling, out)
    limits = image_limits(config, model_dir)
    manifest = prepare_multimodal(sources, model_dir, out / "data", limits=limits,
                                  max_length=config.model.max_length, dedup=config.data.dedup_exact)
    eval_sets = read_eval_sets(eval_sources, limits)
    before = evaluate_model(model_dir, eval_sets, config)
    return ScoredBase(model_dir, manifest, eval_sets, before, in_domain, out_of_domain, resolved)


def plan_data(config: VlmExperimentConfig):
    """(train sources, eval sources, in-domain names, out-of-domain names), generating the corpus if set."""
    from instune.data.prepare_multimodal import MultimodalSource
    from instune.data.read import expand_paths

    def planned(source):
        return MultimodalSource(source.name, source.domain, source.format, expand_paths(source.name, source.path))

    sources = [planned(s) for s in config.data.sources]
    eval_sources = [planned(s) for s in config.data.eval_sources]
    in_domain, out_of_domain = config.eval.in_domain or [], config.eval.out_of_domain or []
    corpus = config.corpus
    if corpus is not None:
        from instune.default.image_tasks import generate_image_corpus

        files = generate_image_corpus(corpus.dir, corpus.in_domain, corpus.out_of_domain, corpus.train_per_domain,
                                      corpus.eval_per_domain, corpus.seed)
        sources = sources or [MultimodalSource("image_tasks", "mixed", "llava", [str(files.train)])]
        eval_sources = eval_sources or [MultimodalSource(d, d, "llava", [str(p)]) for d, p in files.eval.items()]
        if mixes_text(config):
            from instune.default.image_tasks import write_text_tasks

            # Twice as many text-only examples as image-text ones: exact dedup drops the text tasks drawn twice
            # (~6%), and training_rows needs as many as there are image-text rows for a share of 0.
            text = write_text_tasks(corpus.dir, 2 * corpus.train_per_domain * len(corpus.in_domain), corpus.seed)
            sources.append(MultimodalSource(TEXT_SOURCE, "text", "llava", [str(text)]))
        in_domain = config.eval.in_domain or list(corpus.in_domain)
        out_of_domain = config.eval.out_of_domain or list(corpus.out_of_domain)
    return sources, eval_sources, in_domain, out_of_domain


# The source of the text-only examples that data.multimodal_share mixes in.
TEXT_SOURCE = "text_tasks"


def mixes_text(config: VlmExperimentConfig) -> bool:
    """Whether the prepared data needs the text-only examples: a share under 1, or a sweep over the share."""
    swept = config.sweep is not None and "data.multimodal_share" in config.sweep.params
    return config.data.multimodal_share < 1 or swept


def training_rows(tokenized_dir: Path, multimodal_share: float, seed: int):
    """The training rows (a pyarrow Table) for a share of image-text rows: as many rows as there are image-text
    ones, round(share * n) of them image-text and the rest text-only, in a seeded random order (the loop reads
    Ray Data shards in order)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(tokenized_dir)
    is_text = pc.equal(table["source"], TEXT_SOURCE)
    image_rows, text_rows = table.filter(pc.invert(is_text)), table.filter(is_text)
    n = image_rows.num_rows
    take_images = round(multimodal_share * n)
    assert text_rows.num_rows >= n - take_images, \
        f"{text_rows.num_rows} text-only rows in {tokenized_dir}, {n - take_images} needed"
    # The first rows of each kind: a larger share keeps the smaller share's image rows, so trials differ only
    # in what the share changes.
    mixed = pa.concat_tables([image_rows.slice(0, take_images), text_rows.slice(0, n - take_images)])
    return mixed.take(np.random.default_rng(seed).permutation(mixed.num_rows))


def image_limits(config: VlmExperimentConfig, model_dir: str):
    """What an image may be, and the side prepare resizes it to: the model's input, the embedded model's
    image_size or a `model.path` model's image processor's (a 336-pixel LLaVA must not get 32-pixel images)."""
    from instune.data.images import ImageLimits

    side = config.model.embedded.image_size
    if config.model.path:
        from transformers import AutoImageProcessor

        from instune.data.multimodal_tokenize import image_side

        side = image_side(AutoImageProcessor.from_pretrained(model_dir))
    return ImageLimits(size=side, **config.data.images.model_dump())


def base_model(config: VlmExperimentConfig, eval_sources) -> str:
    """The model directory: `model.path`, or the embedded VLM built (once) under output_dir/base_model."""
    if config.model.path:
        from instune.base_model import check_model_dir

        return str(check_model_dir(config.model.path, "model.path"))
    from instune.default.image_tasks import PROMPTS
    from instune.default.vlm import ensure_embedded_vlm

    # The tokenizer learns the task words: prompts, answers and captions of the corpus.
    texts = [p for prompts in PROMPTS.values() for p in prompts] + [
        "one two three four red green blue yellow circle circles square squares triangle triangles left right top "
        "bottom the digit 0 1 2 3 4 5 6 7 8 9 a at Describe the image."] * 20
    return str(ensure_embedded_vlm(Path(config.output_dir) / "base_model", texts, config.model.embedded).resolve())


def read_eval_sets(eval_sources, limits) -> list[dict]:
    """Every kept eval record (messages, images, domain, caption), read in this process: eval sets are small."""
    from instune.data.multimodal_formats import to_multimodal
    from instune.data.read import iter_raw_records

    examples = []
    for source in eval_sources:
        for file in source.files:
            for kind, record in to_multimodal(iter_raw_records(file, 64 << 20), source.name, source.domain,
                                              source.format, file, limits):
                if kind == "kept":
                    examples.append({**record, "caption": json.loads(record["metadata"]).get("caption")})
    return examples


def evaluate_model(model_dir: str, examples: list[dict], config: VlmExperimentConfig) -> dict:
    """{domain: generation scores + retrieval recalls} of the model at `model_dir`."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from instune.eval.image_answers import answer_scores
    from instune.eval.retrieval import RetrievalPool, retrieval_by_domain

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    scores = answer_scores(model, processor, examples, config.eval.max_new_tokens)
    pools: dict[str, RetrievalPool] = {}
    for example in examples:
        if example["caption"] and len(example["images"]) == 1:
            pool = pools.setdefault(example["domain"], RetrievalPool([], []))
            if len(pool.images) < config.eval.retrieval_images:
                pool.images.append(example["images"][0])
                pool.captions.append(example["caption"])
    retrieval = retrieval_by_domain(model, processor, pools)
    return {d: {**scores.get(d, {}), **retrieval.get(d, {})} for d in sorted(set(scores) | set(retrieval))}


def gaps(results: dict, in_domain: list[str], out_of_domain: list[str]) -> dict:
    from instune.eval.retrieval import domain_gap

    return domain_gap(results, in_domain, out_of_domain) if results else {}


def train(config: VlmExperimentConfig, model_dir: str, out: Path, data_dir: Path | None = None) -> Path:
    """Train on the tokenized rows under `data_dir` (default out/data), mixed by data.multimodal_share when
    they hold text-only examples, with Ray Train into `out`; return the exported merged model directory."""
    from instune.data.raydata import read_parquet
    from instune.train.export import export_model
    from instune.train.loop import LoopSettings
    from instune.train.methods import MethodSettings
    from instune.train.trainer import run_ray_training

    peft, t, s = config.peft, config.train, config.strategy
    method = MethodSettings(**{k: v for k, v in peft.model_dump().items() if k in MethodSettings.__dataclass_fields__})
    settings = LoopSettings(model_path=model_dir, total_steps=t.max_steps, method=method, lr=t.lr,
                            warmup_ratio=t.warmup_ratio, micro_batch_size=t.micro_batch_size, seed=t.seed,
                            log_every=t.log_every, checkpoint_every=t.checkpoint_every, strategy=s.name,
                            zero_stage=s.zero_stage,
                            offload_optimizer=s.offload_optimizer, offload_params=s.offload_params,
                            deepspeed=dict(s.deepspeed), use_gpu=config.scaling.use_gpu,
                            train_vision_tower=config.model.train_vision_tower)
    tokenized = (data_dir or out / "data") / "tokenized"
    if mixes_text(config):
        import ray.data

        rows = ray.data.from_arrow(training_rows(tokenized, config.data.multimodal_share, t.seed))
    else:
        rows = read_parquet(tokenized)
    sc = config.scaling
    result, _ = run_ray_training(settings, {"train": rows},
                                 num_workers=sc.num_workers, use_gpu=sc.use_gpu, cpus_per_worker=sc.cpus_per_worker,
                                 gpus_per_worker=sc.gpus_per_worker, placement_strategy=sc.placement_strategy,
                                 storage_dir=out / "train", run_name="run", max_failures=t.max_failures)
    assert result.checkpoint is not None, f"training finished without a checkpoint; see {out / 'train'}"
    with result.checkpoint.as_directory() as checkpoint_dir:
        _, merged = export_model(Path(checkpoint_dir), model_dir, model_dir, method.method, out / "model")
    return merged


METRICS = ("exact_match", "i2t_r1", "i2t_chance_r1", "i2t_r5", "t2i_r1", "t2i_r5")


def results_table(results: dict) -> str:
    """Per domain (in-domain first), each metric before -> after, then the gap rows."""
    rows = [f"{'domain':<18}{'':4}" + "".join(f"{m:>18}" for m in METRICS)]
    for kind, domains in (("in", results["in_domain"]), ("out", results["out_of_domain"])):
        for domain in domains:
            before, after = results["before"].get(domain, {}), results["after"].get(domain, {})
            cells = "".join(f"{_cell(before.get(m), after.get(m)):>18}" for m in METRICS)
            rows.append(f"{domain:<18}{kind:<4}{cells}")
    gap_before, gap_after = results["gap"]["before"], results["gap"]["after"]
    rows.append(f"{'gap (in - out)':<22}" + "".join(f"{_cell(gap_before.get(m), gap_after.get(m)):>18}"
                                                    for m in METRICS))
    return "\n".join(rows)


def _cell(before, after) -> str:
    if before is None or after is None:
        return "-"
    return f"{before:.2f} -> {after:.2f}"


def main(argv: list[str] | None = None) -> int:
    """`instune vlm ARGS`: the same command, its one-line errors and its private Ray cluster (instune/cli.py)."""
    from instune.cli import main as cli_main

    return cli_main(["vlm", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
