"""Sweeps of a preference objective: the checks before Ray starts, and one real Ray Tune sweep over the loss
type (dpo against simpo) on pairs prepared once with their reference log-probs, scored by reward accuracy on
the held-out pairs."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instune.config import load_config, validate_config
from instune.errors import UserError
from instune.tune.sweep import check_sweep, is_prepared_for, needs_precomputed_reference, swept_objectives

WIDTH = 40


def experiment(output_dir, sweep: dict, objective: str = "dpo", **data) -> dict:
    """Pairs from one file, a quarter held out; LoRA on one worker; no eval sets (the pairs score trials)."""
    return {
        "name": "pair_sweep", "output_dir": str(output_dir),
        "model": {"max_length": WIDTH},
        "data": {"sources": [{"name": "pairs", "path": str(Path(output_dir) / "pairs.jsonl"), "format": "pairs"}],
                 "validation_fraction": 0.25} | data,
        "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"objective": objective, "lr": 2e-2, "max_steps": 4, "micro_batch_size": 4, "log_every": 1,
                  "eval_every": 2,
                  "warmup_ratio": 0.0},
        "dpo": {"beta": 0.5},
        "scaling": {"num_workers": 1},
        "sweep": sweep,
    }


def checked(tree: dict):
    config = validate_config(tree, "sweep.yaml")
    check_sweep(config, config.model_dump(mode="json"))
    return config


LOSS_TYPES = {"params": {"train.objective": {"choice": ["dpo", "simpo"]}}, "objective": "reward_accuracy",
              "search": "grid", "scheduler": "fifo"}


def test_a_preference_sweep_is_checked_before_ray_starts(tmp_path):
    config = checked(experiment(tmp_path, LOSS_TYPES))
    assert swept_objectives(config) == ["dpo", "simpo"] and needs_precomputed_reference(config)
    # β, the learning rate and the loss type like any key; the reference is needed only by dpo/ipo/cdpo.
    ranges = {"dpo.beta": {"loguniform": [0.05, 1.0]}, "train.lr": {"choice": [1e-3, 1e-2]}}
    beta = checked(experiment(tmp_path, dict(LOSS_TYPES, search="random", params=ranges)))
    assert swept_objectives(beta) == ["dpo"] and needs_precomputed_reference(beta)
    reference_free = checked(experiment(tmp_path, dict(LOSS_TYPES, params={"train.objective": {
        "choice": ["simpo", "orpo"]}}), objective="simpo"))
    assert not needs_precomputed_reference(reference_free)
    refusals = [
        (experiment(tmp_path, dict(LOSS_TYPES, params={"train.objective": {"choice": ["sft", "dpo"]}})),
         "sweep.params.train.objective: sft trains on conversations and dpo on preference pairs"),
        (experiment(tmp_path, LOSS_TYPES, objective="sft"), "train.objective: sft, but the sweep trains dpo, simpo"),
        (experiment(tmp_path, LOSS_TYPES, validation_fraction=0.0),
         "sweep.objective: reward_accuracy scores held-out pairs; set data.validation_fraction"),
        (experiment(tmp_path, dict(LOSS_TYPES, mix={"weights": {"pairs": 1.0}})),
         "sweep.mix: preference pairs are not mixed"),
        (experiment(tmp_path, dict(LOSS_TYPES, params={"train.lr": {"choice": [1e-3]}}), objective="sft"),
         "sweep.objective: reward_accuracy scores held-out preference pairs, but train.objective is sft"),
        (experiment(tmp_path, dict(LOSS_TYPES, objective="in_domain_loss")),
         "eval.sets: a sweep scores trials on the eval sets"),
        # The base objective (simpo) needs no reference, so only the sweep check can see that dpo trials would.
        (experiment(tmp_path, LOSS_TYPES, objective="simpo") | {"peft": {"method": "full"},
                                                                "dpo": {"reference": "adapter_disabled"}},
         "dpo.reference: adapter_disabled needs peft.method: lora (got full), and the sweep trains dpo"),
    ]
    for tree, message in refusals:
        with pytest.raises(UserError, match=re.escape(message)):
            checked(tree)


def test_prepared_pairs_are_reused_only_with_the_reference_the_swept_objectives_need(tmp_path):
    config = checked(experiment(tmp_path, LOSS_TYPES))
    made = config.model_dump(mode="json")
    assert is_prepared_for({"config": made, "kind": "preference", "reference": "precompute"}, config)
    # Prepared for simpo alone: no reference log-probs, which the dpo trials need.
    assert not is_prepared_for({"config": made, "kind": "preference", "reference": "none"}, config)
    assert not is_prepared_for({"config": made, "kind": "sft"}, config)
    reference_free = checked(experiment(tmp_path, dict(LOSS_TYPES, params={"train.objective": {
        "choice": ["simpo", "orpo"]}}), objective="simpo"))
    assert is_prepared_for({"config": reference_free.model_dump(mode="json"), "kind": "preference",
                            "reference": "none"}, reference_free)


def write_pair_split(model_dir: Path, directory: Path, numbers) -> int:
    """Tokenized, padded pairs with the base model's log-probs as the reference, as prepare_pairs writes them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instune.data.prepare_pairs import pad_rows
    from instune.data.preference_tokenize import tokenize_pairs
    from instune.data.reference_logprobs import sequence_logps
    from instune.train.sessions import PAIR_COLUMNS

    pairs = [{"prompt": [{"role": "user", "content": f"add {a} and {b}:"}], "chosen": str(a + b),
              "rejected": str(a + b + 1)} for a, b in numbers]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenized = tokenize_pairs(pairs, tokenizer, WIDTH, "prompt_left")
    table = pa.table({name: [getattr(t, name).tolist() for t in tokenized] for name in PAIR_COLUMNS})
    base = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    for side in ("chosen", "rejected"):
        sequences = [(getattr(t, f"{side}_input_ids"), getattr(t, f"{side}_labels")) for t in tokenized]
        table = table.append_column(f"ref_{side}_logps", pa.array(sequence_logps(base, sequences, 0, "cpu")))
    directory.mkdir(parents=True)
    pq.write_table(pad_rows(table, width=WIDTH, pad_id=tokenizer.pad_token_id), directory / "part-0.parquet")
    return len(pairs)


@pytest.mark.slow
def test_a_sweep_over_the_loss_type_trains_every_trial_on_the_shared_pairs(ray_cluster, tmp_path):
    """Two Tune trials (dpo, simpo) of 4 steps on one worker each, on pairs prepared once with the reference's
    log-probs; both report reward accuracy on the held-out pairs, which ranks them. Two Ray Train runs inside
    Tune trials: ~1 min on 2 cores, minutes when they are busy, hence slow."""
    from instune.default.model import ensure_embedded_model
    from instune.base_model import tokenizer_training_texts
    from instune.tune.sweep import run_sweep

    model_dir = ensure_embedded_model(tmp_path / "model", tokenizer_training_texts(per_domain=20), vocab_size=400,
                                      hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                      max_position_embeddings=128, seed=0)
    data_dir = tmp_path / "data"
    rows = {"train": write_pair_split(model_dir, data_dir / "train", [(a, b) for a in range(4) for b in range(4)]),
            "validation": write_pair_split(model_dir, data_dir / "validation", [(5, 2), (6, 1), (7, 3), (2, 8)])}
    config = checked(experiment(tmp_path, dict(LOSS_TYPES, max_concurrent_trials=2)))
    manifest = {"config": config.model_dump(mode="json"), "kind": "preference", "reference": "precompute",
                "sources": {"pairs": {"read": 20, "kept": 20, "rejected": 0}},
                "splits": {split: {"rows": n} for split, n in rows.items()}}
    sweep_dir = tmp_path / "sweep"
    paths = run_sweep(config, [], manifest, str(model_dir), str(model_dir), data_dir, sweep_dir)

    with open(paths.results_csv) as f:
        ranked = list(csv.DictReader(f))
    assert sorted(r["train.objective"] for r in ranked) == ["dpo", "simpo"], [r.get("error") for r in ranked]
    assert all(r["status"] == "finished" and int(r["steps"]) == 4 for r in ranked)
    # Ranked by reward accuracy on the held-out pairs (4 pairs: a multiple of 1/4), best first.
    accuracies = [float(r["objective"]) for r in ranked]
    assert accuracies == sorted(accuracies, reverse=True)
    assert all(float(r["reward_accuracy"]) == a and (4 * a).is_integer() for r, a in zip(ranked, accuracies))
    by_objective = {r["train.objective"]: r for r in ranked}
    for objective, row in by_objective.items():
        metrics = [json.loads(line) for line in
                   (sweep_dir / "trials" / row["trial"] / "train/run/metrics.jsonl").read_text().splitlines()]
        # Held-out pairs scored at steps 2 and 4; the objective is the last.
        evals = [m for m in metrics if "eval_rewards/accuracy" in m]
        assert [m["step"] for m in evals] == [2, 4], objective
        assert evals[-1]["eval_rewards/accuracy"] == float(row["objective"])
        assert evals[-1]["eval_rewards/margin"] == pytest.approx(float(row["reward_margin"]))
        if objective == "dpo":
            # The trial read the reference log-probs prepared for it: a fresh adapter is its reference, so
            # DPO starts at exactly log 2.
            assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
        else:
            # SimPO's reward is its own β (2.0) times the mean token log-prob: negative from the start, where
            # DPO's is 0.
            assert metrics[0]["rewards/chosen"] < -0.1
    best = load_config(paths.best_config)
    assert best.sweep is None and best.train.objective == ranked[0]["train.objective"]
