"""Batched evaluation in a Ray Data actor pool: each actor loads the model once and serves many batches."""

from __future__ import annotations

from instune.eval.evaluate import EvalSet, EvalSettings, EvalWorker, SetResult, example_rows, score_sets
from instune.progress import Progress


def evaluate_with_ray(model_path: str, eval_sets: list[EvalSet], settings: EvalSettings, *, num_actors: int,
                      use_gpu: bool, base_model_path: str | None = None, tokenizer_path: str | None = None,
                      cpus_per_actor: float = 1) -> tuple[list[SetResult], list[dict]]:
    """(one SetResult per set, per-example predictions), with `num_actors` model copies (a GPU each if asked).

    Needs a running Ray (instune/ray_runtime.py); prints progress lines with the rate and ETA. Examples are
    sorted by length before batching, so a batch pads to similar lengths; every example carries its set and
    index, so the order rows come back in is free.
    """
    import ray.data

    rows = example_rows(eval_sets)
    answered = ray.data.from_items(rows).map_batches(
        EvalWorker,
        fn_constructor_kwargs={"model_path": model_path, "base_model_path": base_model_path,
                               "settings": settings, "use_gpu": use_gpu, "tokenizer_path": tokenizer_path},
        batch_size=settings.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
    )
    progress = Progress("eval", len(rows), "examples")
    answers = []
    for row in answered.iter_rows():
        answers.append(row)
        progress.update(len(answers))
    print(progress.finished(f"{len(answers)} examples"), flush=True)
    return score_sets(eval_sets, answers)
