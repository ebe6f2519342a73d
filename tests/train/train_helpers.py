"""Helpers for the training tests: tiny models and packed rows written by the tests, torchrun launches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN = 32
VOCAB_TEXTS = ["system\nuser\nassistant\n", "add 2 and 3: 5", "reverse [1, 2, 3]: [3, 2, 1]",
               "upper case of abc is ABC", "convert 3 km to m: 3000 m"] * 20


def write_tiny_model(directory: Path, *, biases: bool = True, num_layers: int = 2, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 32) with the embedded tokenizer trained on a few lines; biases for BitFit."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from instune.default.tokenizer import save_tokenizer, train_tokenizer

    tokenizer = train_tokenizer(VOCAB_TEXTS, 300)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=4, intermediate_size=64,
                         max_position_embeddings=128, attention_bias=biases, mlp_bias=biases,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(directory), safe_serialization=True)
    save_tokenizer(tokenizer, directory)
    return directory


def write_packed_rows(directory: Path, rows: int, *, vocab: int = 300, seed: int = 0, packed: bool = True) -> Path:
    """Parquet rows shaped like prepare's output: 1-3 examples per row (or one, padded), prompt tokens
    ignored, so rows have different numbers of target tokens (which is what normalisation must handle)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from instune.data.tokenize import IGNORE_INDEX

    rng = np.random.default_rng(seed)
    out = {"input_ids": [], "labels": [], "position_ids": [], "num_examples": [], "num_target_tokens": []}
    for _ in range(rows):
        ids, labels, positions, examples = [], [], [], 0
        while len(ids) < SEQ_LEN and (packed or examples == 0):
            n = min(int(rng.integers(6, 20)), SEQ_LEN - len(ids))
            if n < 4:
                break
            prompt = int(rng.integers(1, n))
            tokens = rng.integers(3, vocab, size=n).tolist()
            ids += tokens
            labels += [IGNORE_INDEX] * prompt + tokens[prompt:]
            positions += list(range(n))
            examples += 1
        pad = SEQ_LEN - len(ids)
        ids += [0] * pad
        labels += [IGNORE_INDEX] * pad
        positions += list(range(pad))
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["position_ids"].append(positions)
        out["num_examples"].append(examples)
        out["num_target_tokens"].append(sum(label != IGNORE_INDEX for label in labels[1:]))
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(out), directory / "part-0.parquet")
    return directory


PAIR_WIDTH = 40


def arithmetic_pairs(numbers) -> list[dict]:
    """Preference pairs "add a and b:": the sum chosen, the sum plus one rejected."""
    return [{"prompt": [{"role": "user", "content": f"add {a} and {b}:"}], "chosen": str(a + b),
             "rejected": str(a + b + 1)} for a, b in numbers]


def write_pairs(model_dir, directory: Path, pairs: list[dict], reference_offsets=None) -> str:
    """Pairs as prepare_pairs writes them (tokenized, padded to PAIR_WIDTH, with the model's own log-probs as
    the reference), in one Parquet file; returns its path. `reference_offsets`: (chosen, rejected) added to each
    pair's reference log-probs, so a fresh adapter is no longer its reference."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instune.data.prepare_pairs import pad_rows
    from instune.data.preference_tokenize import tokenize_pairs
    from instune.data.reference_logprobs import sequence_logps
    from instune.train.preference_step import PAIR_COLUMNS

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenized = tokenize_pairs(pairs, tokenizer, PAIR_WIDTH, "drop")
    assert not any(isinstance(t, Exception) for t in tokenized)
    table = pa.table({name: [getattr(t, name).tolist() for t in tokenized] for name in PAIR_COLUMNS})
    base = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    for i, side in enumerate(("chosen", "rejected")):
        sequences = [(getattr(t, f"{side}_input_ids"), getattr(t, f"{side}_labels")) for t in tokenized]
        logps = sequence_logps(base, sequences, 0, "cpu")
        if reference_offsets is not None:
            logps = logps + np.array([offsets[i] for offsets in reference_offsets], dtype=logps.dtype)
        table = table.append_column(f"ref_{side}_logps", pa.array(logps))
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pad_rows(table, width=PAIR_WIDTH, pad_id=tokenizer.pad_token_id), directory / "part-0.parquet")
    return str(directory / "part-0.parquet")


def run_torchrun(settings, train_dir: Path, output: Path, nproc: int, *, validation_dir: Path | None = None,
                 timeout: int = 300, env: dict | None = None, expect_failure: bool = False
                 ) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N -m instune.train.torchrun_main` on CPU; raises with its output on failure."""
    output.mkdir(parents=True, exist_ok=True)
    settings_file = output / "settings.json"
    settings_file.write_text(json.dumps(settings.to_dict() if hasattr(settings, "to_dict") else asdict(settings)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           "-m", "instune.train.torchrun_main", "--settings", str(settings_file), "--train-data", str(train_dir),
           "--output", str(output)]
    if validation_dir:
        cmd += ["--validation-data", str(validation_dir)]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **(env or {}))
    done = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if expect_failure:
        assert done.returncode != 0, "torchrun was expected to fail"
        return done
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def read_metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


# Runs on 2 torchrun workers that tests in several modules check, trained together in one launch by the session
# fixture `two_worker_runs` (conftest.py): a launch pays for its processes' start and imports (torch,
# transformers, PEFT, DeepSpeed) whatever it trains. A test module adds its plan at import, so the launch holds
# the plans of the modules collected: name -> plan(model directory, plan's directory) -> run_many's runs,
# with inputs and outputs under the plan's directory.
TWO_WORKER_PLANS: dict = {}


def two_worker_plan(name: str):
    """Decorator: add a plan to TWO_WORKER_PLANS under `name`; a test finds its outputs in
    two_worker_runs[name]."""
    def add(plan):
        TWO_WORKER_PLANS[name] = plan
        return plan
    return add


def run_many(runs: list[dict], tmp_path: Path, nproc: int = 2, timeout: int = 600) -> None:
    """Run several trainings in one torchrun launch (run_many.py); each run is
    {"settings": LoopSettings, "train": [parquet files], "output": dir}."""
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps([dict(run, settings=run["settings"].to_dict(), output=str(run["output"]))
                                for run in runs]))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
         str(REPO / "tests/train/run_many.py"), str(spec)],
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)), capture_output=True, text=True,
        timeout=timeout)
    assert done.returncode == 0, done.stderr[-6000:]


def logits_sgd_step(model_dir: Path, rows_dir: Path) -> dict:
    """{name: weight} after one SGD step (lr 1, no clipping) of full fine-tuning on every row of `rows_dir`,
    with the loss computed from the model's whole logits tensor: the reference for the loop's own loss."""
    import pyarrow.parquet as pq
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from instune.data.tokenize import IGNORE_INDEX

    table = pq.read_table(rows_dir / "part-0.parquet")
    batch = {k: torch.tensor(table[k].to_pylist()) for k in ("input_ids", "labels", "position_ids")}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    # No KV cache: with one, transformers would not separate the packed examples.
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum") / (targets != IGNORE_INDEX).sum()
    loss.backward()
    return {name: (p - p.grad).detach() for name, p in model.named_parameters()}
