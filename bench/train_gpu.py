"""Training on one GPU without Ray: tokens/s, MFU and peak memory of a ~1B Llama built from a config.

    python bench/train_gpu.py [--steps 25] [--seq-len 2048] [--micro-batch 8] [--workdir /tmp/instune-gpu-bench]
                              [--only NAME ...]

Each configuration runs the per-worker loop (`python -m instune.train.torchrun_main`) in its own process, as
a one-rank torchrun job would, so Ray is not needed (the GPU image has none). The model is TinyLlama-shaped
(22 layers, hidden 2048, GQA 32/4 heads, vocab 32000, 1.1B parameters), randomly initialised and saved in
bf16; the rows are best-fit packed examples of lognormal lengths (median ~150 tokens), like a prepare run's
output. Configurations:

  lora-ddp      LoRA r=16 on every linear layer, bf16 base, DDP engine
  full-ddp      every weight, fp32 master weights under bf16 autocast, DDP engine
  full-zero2    every weight, DeepSpeed ZeRO-2, bf16
  full-zero3    every weight, DeepSpeed ZeRO-3, bf16
  lora-zero3-resume  LoRA under ZeRO-3 with dropout 0.1: the last rank dies at step 8, the run is started
                again on the same output and resumes from step 5's checkpoint; the losses of steps 6-7 must
                match the first attempt's (weights, optimizer, data position and CUDA RNG restored)
  lora-ddp-flex, full-ddp-flex  the DDP runs again with attn_implementation flex_attention

Measured on one H200 (torch 2.11, DeepSpeed 0.19.8), tokens/s / MFU / peak GiB: lora-ddp 37,957 / 17.2% / 44.0;
full-zero3 36,824 / 24.6% / 56.5; full-ddp 39,301 / 26.2% / 60.4; full-zero2 38,211 / 25.5% / 53.6;
lora-ddp-flex 43,130 / 19.5% / 40.2; full-ddp-flex 45,160 / 30.1% / 56.6. Resume: the second attempt reported
steps 6-10; step 6 repeated the first attempt's loss exactly and step 7 to 3e-6 (relative). With random tokens
and LoRA's B starting at zero, dropout barely moves the loss, so this shows the resume point, weights and data
position more than the RNG.

Steady tokens/s and MFU are the means of the loop's own windows after the first (which holds warm-up);
wall s is the whole process: start-up, model load, steps and the final checkpoint. MFU counts 6N FLOPs per
token for full training and 4N + 2N_trainable for LoRA (metrics.flops_per_token) against the card's dense
bf16 peak. Prints one table and writes it to WORKDIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0)


def build_model(directory: Path) -> Path:
    """The ~1B Llama, built on the GPU in bf16 and saved as a normal HF model directory (once)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from instune.atomic import atomic_dir

    if (directory / "config.json").is_file():
        return directory
    config = LlamaConfig(**MODEL, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    with atomic_dir(directory) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
    return directory


def write_rows(directory: Path, rows_needed: int, seq_len: int, seed: int = 0) -> Path:
    """Packed rows (input_ids, labels, position_ids) of lognormal-length examples, prompt tokens ignored,
    built as bench/train_throughput.py builds its rows."""
    from train_throughput import examples_of, lognormal_lengths
    from train_throughput import write_rows as write_parquet

    from instune.data.pack import pack

    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    while len(rows) < rows_needed:
        # The +6 and +2 stand for the chat template's tokens around a prompt and after a response.
        lengths = [(p + 6, r + 2) for p, r in lognormal_lengths(4 * rows_needed * seq_len // 150, rng)]
        rows += pack(examples_of(lengths, seq_len, MODEL["vocab_size"], pad_id=0, seed=seed + len(rows)),
                     seq_len, pad_id=0)
    return write_parquet(rows[:rows_needed], directory)


def run_loop(settings, rows: Path, output: Path, env: dict | None = None) -> dict:
    """One `python -m instune.train.torchrun_main` process; returns its metrics and wall time."""
    output.mkdir(parents=True, exist_ok=True)
    settings_file = output / "settings.json"
    settings_file.write_text(json.dumps(settings.to_dict()))
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "instune.train.torchrun_main", "--settings", str(settings_file),
         "--train-data", str(rows), "--output", str(output), "--keep-checkpoints", "1"],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
             **(env or {})}, capture_output=True, text=True)
    wall = time.perf_counter() - started
    metrics_file = output / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.is_file() else []
    return {"returncode": proc.returncode, "wall_s": wall, "metrics": metrics,
            "stderr_tail": proc.stderr[-3000:] if proc.returncode else ""}


def steady(metrics: list[dict]) -> dict:
    windows = metrics[1:] or metrics

    def mean(key: str) -> float:
        values = [m[key] for m in windows if key in m]
        return float(np.mean(values)) if values else float("nan")

    return {"tokens_per_s": mean("tokens_per_second"), "target_tokens_per_s": mean("target_tokens_per_second"),
            "mfu": mean("mfu"), "peak_memory_gib": max((m["peak_memory_mb"] for m in metrics), default=0) / 1024,
            "first_loss": metrics[0]["loss"] if metrics else None,
            "last_loss": metrics[-1]["loss"] if metrics else None,
            "loop_s": metrics[-1]["elapsed_s"] if metrics else None,
            "total_params": metrics[0]["total_params"] if metrics else None,
            "trainable_params": metrics[0]["trainable_params"] if metrics else None}


def resume_check(base, rows: Path, work: Path) -> dict:
    """Crash at step 8 of 10 under ZeRO-3 LoRA (dropout 0.1), start again, compare steps 6-7."""
    from instune.train.loop import CRASH_MARKER_ENV

    settings = replace(base, total_steps=10, log_every=1, checkpoint_every=5)
    output = work / "lora-zero3-resume"
    shutil.rmtree(output, ignore_errors=True)
    marker = work / "crash_at_step"
    marker.write_text("8")
    first = run_loop(settings, rows, output, env={CRASH_MARKER_ENV: str(marker)})
    before = {m["step"]: m["loss"] for m in first["metrics"]}
    second = run_loop(settings, rows, output)
    resumed = second["metrics"][len(first["metrics"]):]  # metrics.jsonl holds both attempts
    after = {m["step"]: m["loss"] for m in resumed}
    compared = {s: (before.get(s), after.get(s)) for s in (6, 7)}
    # The second attempt must start at step 6, not 1 (a run from scratch repeats the same losses too), and
    # repeat the first attempt's steps to within GPU reduction-order noise.
    same = [m["step"] for m in resumed] == [6, 7, 8, 9, 10] and all(
        a is not None and b is not None and abs(a - b) <= 1e-5 * abs(a) for a, b in compared.values())
    return {"first_rc": first["returncode"], "second_rc": second["returncode"],
            "steps_reported": [m["step"] for m in second["metrics"]],
            "losses_6_7_before_after": compared, "resumed_equal": same,
            "stderr_tail": second["stderr_tail"] or (first["stderr_tail"] if first["returncode"] not in (0, 1) else "")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--workdir", default="/tmp/instune-gpu-bench")
    parser.add_argument("--only", nargs="*", help="run only these configurations")
    args = parser.parse_args()

    import torch

    from instune.train.loop import LoopSettings
    from instune.train.methods import MethodSettings

    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    work = Path(args.workdir)
    started = time.perf_counter()
    model_dir = build_model(work / "model")
    rows = write_rows(work / "rows", (args.steps + 5) * args.micro_batch, args.seq_len)
    setup_s = time.perf_counter() - started
    lora = MethodSettings(method="lora", r=16, alpha=32, dropout=0.0)
    full = MethodSettings(method="full")
    base = LoopSettings(model_path=str(model_dir), total_steps=args.steps, micro_batch_size=args.micro_batch,
                        log_every=5, lr=1e-4, warmup_ratio=0.1, use_gpu=True, dtype="bfloat16", method=lora)
    configs = {
        "lora-ddp": dict(method=lora),
        "full-zero3": dict(method=full, strategy="deepspeed", zero_stage=3),
        "lora-zero3-resume": None,
        "full-ddp": dict(method=full),
        "full-zero2": dict(method=full, strategy="deepspeed", zero_stage=2),
        # The same two with PyTorch's flex attention: packed rows need a block-diagonal mask, which SDPA's
        # flash kernel cannot take, so SDPA runs its slower masked kernel.
        "lora-ddp-flex": dict(method=lora, attn_implementation="flex_attention"),
        "full-ddp-flex": dict(method=full, attn_implementation="flex_attention"),
    }
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "setup_s": setup_s,
               "model": MODEL, "seq_len": args.seq_len, "micro_batch": args.micro_batch, "steps": args.steps,
               "runs": {}}
    out_file = work / "results.json"
    for name, overrides in configs.items():
        if args.only and name not in args.only:
            continue
        if overrides is None:
            results["resume"] = resume_check(replace(base, strategy="deepspeed", zero_stage=3, method=replace(
                lora, dropout=0.1)), rows, work)
            print(name, json.dumps(results["resume"]), flush=True)
        else:
            output = work / "runs" / name
            shutil.rmtree(output, ignore_errors=True)
            run = run_loop(replace(base, **overrides), rows, output)
            results["runs"][name] = {"returncode": run["returncode"], "wall_s": run["wall_s"],
                                     **steady(run["metrics"]), "stderr_tail": run["stderr_tail"]}
            shutil.rmtree(output, ignore_errors=True)  # a full checkpoint of 1.1B parameters is ~17 GB
            print(name, json.dumps({k: v for k, v in results["runs"][name].items() if k != "stderr_tail"}),
                  flush=True)
            if run["returncode"]:
                print(run["stderr_tail"], flush=True)
        out_file.write_text(json.dumps(results, indent=1))

    print(f"\n{results['device']}, torch {results['torch']}; 1.1B Llama; {args.steps} steps of "
          f"{args.micro_batch} x {args.seq_len} tokens; setup (model + rows) {setup_s:.0f} s")
    print(f"{'configuration':<14} {'tokens/s':>9} {'MFU':>6} {'peak GiB':>9} {'loss first->last':>17} {'wall s':>7}")
    for name, r in results["runs"].items():
        if r["returncode"]:
            print(f"{name:<14} failed (exit {r['returncode']})")
            continue
        print(f"{name:<14} {r['tokens_per_s']:>9.0f} {r['mfu']:>6.1%} {r['peak_memory_gib']:>9.1f} "
              f"{r['first_loss']:>8.3f}->{r['last_loss']:<8.3f} {r['wall_s']:>7.0f}")
    if "resume" in results:
        print(f"resume under ZeRO-3: steps {results['resume']['steps_reported']}, "
              f"steps 6-7 equal after resume: {results['resume']['resumed_equal']}")


if __name__ == "__main__":
    main()
