"""instune's training against a plain transformers + PEFT loop, side by side on one GPU and the same examples.

    python bench/train_gpu.py [--cases 1b-full 1b-lora 8b-lora] [--runners baseline torchrun ray]
                              [--steps 20] [--seq-len 2048] [--micro-batch 8] [--baseline-examples 8]
                              [--attn varlen_attention] [--no-compile] [--kernels auto] [--resume-check]
    python bench/train_gpu.py --smoke      # the same runs on the embedded model on the CPU, a few steps

Cases (random weights from the published configs, saved once under WORKDIR/models):
  1b-full   Llama-3.2-1B shape (16 layers, hidden 2048, GQA 32/8, vocab 128,256, tied head), every weight:
            fp32 master weights under bf16 autocast
  1b-lora   the same, LoRA r=16 on every linear layer, bf16 base
  8b-lora   Llama-3.1-8B shape (32 layers, hidden 4096, GQA 32/8, vocab 128,256), LoRA r=16, bf16 base

Runners, each in its own process, over the same examples (lognormal lengths, median ~150 tokens, as an
instruction corpus), `--steps` optimizer steps of `--micro-batch` packed rows of `--seq-len` tokens:
  baseline   what users write with transformers + PEFT: SDPA attention, the examples of each step's rows in
             micro-batches of `--baseline-examples` padded to their longest (as DataCollatorForSeq2Seq does,
             labels -100 on prompt and padding), the model's own loss divided by the accumulation count,
             AdamW, clipping at 1.0
  torchrun   instune's per-worker loop without Ray (python -m instune.train.torchrun_main), the fast path:
             model.kernels (auto: Liger on CUDA when installed), the loss without logits, `--attn`, and
             train.compile unless --no-compile
  torchrun-unfused   the same loop with model.kernels none, sdpa and no compilation: the unfused path
             whose loss after the same steps (same rows, same order) the fast path must match (1e-2 relative)
  ray        the same loop through Ray Train (run_ray_training, one GPU worker, the rows as a Ray Dataset);
             needs Ray (bench/gpu_bundle.py carries it to a machine without)
  ray-zero2, ray-zero3   the ray runner with DeepSpeed ZeRO-2 / ZeRO-3 (full fine-tuning cases)

Printed per run: real (non-pad) tokens/s, steady after the first window of 5 steps; MFU; peak GPU memory;
the loss at the last step. MFU counts model FLOPs per real token against the card's dense bf16 peak:
6N + 12·L·H·d_head·T for full fine-tuning, 4N + 2·N_trainable + 12·L·H·d_head·T for LoRA, where N counts the
weights that multiply (the input embedding table is a lookup, left out unless tied to the head) and T is the
examples' own length weighted by tokens (sum l² / sum l): each token attends within its example in every
runner, so T is the same useful attention work for all of them. Then the ratios the issue's targets ask
for: instune/baseline tokens/s and peak memory per case, Ray/torchrun tokens/s.

Rows are shuffled by each runner's data path, so the examples of a given step differ between runners; over
the run they are the same (the rows are exactly steps x micro-batch), and the losses compare loosely.
--resume-check adds the ZeRO-3 LoRA crash-and-resume check on the 1B shape (the last rank dies at step 8 of
10 and the run is started again: steps 6-7 must repeat the first attempt's losses).

Earlier figures (one H200, torch 2.11, a 1.1B Llama with a 32k vocabulary, 8 x 2048 packed tokens, SDPA,
the logits path): LoRA 37,957 tokens/s, MFU 17.2 %; full 39,301 / 26.2 %; flex_attention +14-15 %.
Writes WORKDIR/results.json.
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
sys.path.insert(0, str(ROOT / "bench"))

LLAMA_3 = dict(num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
               rms_norm_eps=1e-5)
SHAPES = {
    "1b": dict(LLAMA_3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, vocab_size=128256,
               tie_word_embeddings=True),
    "8b": dict(LLAMA_3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, vocab_size=128256,
               tie_word_embeddings=False),
}
CASES = {"1b-full": ("1b", "full"), "1b-lora": ("1b", "lora"), "8b-lora": ("8b", "lora")}
RUNNERS = ("baseline", "torchrun", "torchrun-unfused", "ray", "ray-zero2", "ray-zero3")
WINDOW = 5  # steps per metrics window; the first window holds warm-up (and compilation)
PAD_ID = 0


# ---------------------------------------------------------------- models and examples


def build_model(directory: Path, shape: dict, device: str) -> Path:
    """A Llama with random weights from `shape`, saved in bf16 (on CUDA) as a normal HF directory, once."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from instune.atomic import atomic_dir

    if (directory / "config.json").is_file():
        return directory
    config = LlamaConfig(**shape, pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
    with atomic_dir(directory) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
    return directory


def packed_bins(rows_needed: int, seq_len: int, vocab: int, seed: int = 0) -> list:
    """`rows_needed` best-fit packed bins of lognormal-length examples (prompt tokens ignored), built as
    bench/train_throughput.py builds its rows; each bin keeps its examples for the baseline."""
    from train_throughput import examples_of, lognormal_lengths

    from instune.data.pack import pack_bins

    rng = np.random.default_rng(seed)
    bins: list = []
    while len(bins) < rows_needed:
        # The +6 and +2 stand for the chat template's tokens around a prompt and after a response.
        lengths = [(p + 6, r + 2) for p, r in lognormal_lengths(4 * rows_needed * seq_len // 150, rng)]
        bins += pack_bins(examples_of(lengths, seq_len, vocab, pad_id=PAD_ID, seed=seed + len(bins)), seq_len,
                          pad_id=PAD_ID)
    # The fullest bins: the packer closes its last open bins part-empty.
    return sorted(bins, key=lambda b: -b.length)[:rows_needed]


def write_data(directory: Path, bins: list, seq_len: int) -> dict:
    """rows/ (Parquet, as prepare writes them) and examples.json (per row, for the baseline); returns the
    real-token statistics MFU needs."""
    from train_throughput import write_rows

    from instune.data.pack import finish

    write_rows([finish(b, seq_len, PAD_ID) for b in bins], directory / "rows")
    examples = [[[list(map(int, ids)), list(map(int, labels))] for ids, labels in b.examples] for b in bins]
    (directory / "examples.json").write_text(json.dumps(examples))
    lengths = np.array([len(ids) for row in examples for ids, _ in row], dtype=np.float64)
    return {"real_fraction": float(lengths.sum() / (len(bins) * seq_len)),
            "attention_length": float((lengths ** 2).sum() / lengths.sum()),
            "examples": len(lengths), "median_length": float(np.median(lengths))}


def flops_per_real_token(shape: dict, total_params: int, trainable_params: int, full: bool,
                         attention_length: float) -> float:
    """6N + 12·L·H·d_head·T (full) or 4N + 2N_trainable + 12·L·H·d_head·T (LoRA), N the multiplying weights."""
    embedding = 0 if shape["tie_word_embeddings"] else shape["vocab_size"] * shape["hidden_size"]
    weights = total_params - embedding
    trainable = weights if full else trainable_params
    attention = 12 * shape["num_hidden_layers"] * shape["hidden_size"] * attention_length
    return 4 * weights + 2 * trainable + attention


# ---------------------------------------------------------------- the baseline (its own process)


def baseline_worker(spec: dict) -> dict:
    """A plain transformers + PEFT loop over the examples of the rows, as users write it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from instune.data.tokenize import IGNORE_INDEX
    from instune.train.metrics import peak_memory_bytes

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    lora = spec["method"] == "lora"
    # The same precision recipe as instune's DDP runs: a LoRA base in bf16, full fine-tuning in fp32 weights;
    # bf16 autocast on the GPU either way.
    dtype = torch.bfloat16 if (lora and cuda) else torch.float32
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype, attn_implementation="sdpa").to(device)
    if lora:
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    trainable, total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(params, lr=spec["lr"])
    examples = json.loads(Path(spec["examples"]).read_text())
    per_step = spec["micro_batch"]
    model.train()

    def collate(chunk):  # DataCollatorForSeq2Seq: pad to the longest in the batch, labels with -100
        longest = max(len(ids) for ids, _ in chunk)
        ids = [i + [PAD_ID] * (longest - len(i)) for i, _ in chunk]
        labels = [lab + [IGNORE_INDEX] * (longest - len(lab)) for _, lab in chunk]
        mask = [[1] * len(i) + [0] * (longest - len(i)) for i, _ in chunk]
        return {k: torch.tensor(v, device=device) for k, v in
                (("input_ids", ids), ("labels", labels), ("attention_mask", mask))}

    windows, last_loss, window_tokens = [], None, 0
    window_start = time.perf_counter()
    for step in range(spec["steps"]):
        step_examples = [e for row in examples[step * per_step:(step + 1) * per_step] for e in row]
        micro = [step_examples[i:i + spec["baseline_examples"]]
                 for i in range(0, len(step_examples), spec["baseline_examples"])]
        loss_sum, targets = 0.0, 0
        for chunk in micro:
            batch = collate(chunk)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = model(**batch).loss
            (loss / len(micro)).backward()
            # The model's loss is a mean over this micro-batch's targets; weigh it back for the report.
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            loss_sum, targets = loss_sum + float(loss) * n, targets + n
            window_tokens += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        last_loss = loss_sum / max(targets, 1)
        if (step + 1) % WINDOW == 0:
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            windows.append(window_tokens / (now - window_start))
            window_tokens, window_start = 0, now
    return {"real_tokens_per_s": float(np.mean(windows[1:] or windows)),
            "peak_memory_gib": peak_memory_bytes(device) / 2**30,  # the process's peak RSS on the CPU, as the loop's
            "last_loss": last_loss, "trainable_params": trainable, "total_params": total}


# ---------------------------------------------------------------- instune's runs


def loop_settings(spec: dict):
    from instune.train.loop import LoopSettings
    from instune.train.methods import MethodSettings

    method = MethodSettings(method="lora", r=16, alpha=32, dropout=0.0) if spec["method"] == "lora" else \
        MethodSettings(method="full")
    return LoopSettings(model_path=spec["model"], total_steps=spec["steps"], micro_batch_size=spec["micro_batch"],
                        log_every=WINDOW, lr=spec["lr"], warmup_ratio=0.0, max_grad_norm=1.0,
                        use_gpu=spec["cuda"], dtype="bfloat16" if spec["cuda"] else "float32", method=method,
                        attn_implementation=spec["attn"], kernels=spec["kernels"], compile=spec["compile"],
                        strategy="deepspeed" if spec.get("zero_stage") else "ddp",
                        zero_stage=spec.get("zero_stage") or 2)


def steady(metrics: list[dict], real_fraction: float) -> dict:
    """Means of the loop's own windows after the first; its tokens/s count every position, padding too."""
    windows = metrics[1:] or metrics
    return {"real_tokens_per_s": float(np.mean([m["tokens_per_second"] for m in windows])) * real_fraction,
            "peak_memory_gib": max(m["peak_memory_mb"] for m in metrics) / 1024, "last_loss": metrics[-1]["loss"],
            "trainable_params": metrics[0]["trainable_params"], "total_params": metrics[0]["total_params"]}


def torchrun_worker(spec: dict, output: Path, env: dict | None = None) -> tuple[int, list[dict], str]:
    """One `python -m instune.train.torchrun_main` process (a one-rank job); (exit code, metrics, stderr)."""
    output.mkdir(parents=True, exist_ok=True)
    settings_file = output / "settings.json"
    settings_file.write_text(json.dumps(loop_settings(spec).to_dict()))
    proc = subprocess.run(
        [sys.executable, "-m", "instune.train.torchrun_main", "--settings", str(settings_file),
         "--train-data", spec["rows"], "--output", str(output), "--keep-checkpoints", "1"],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
             **(env or {})}, capture_output=True, text=True)
    metrics_file = output / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.is_file() else []
    return proc.returncode, metrics, proc.stderr[-3000:]


def ray_worker(spec: dict) -> list[dict]:
    """The loop through Ray Train with one worker (a GPU when there is one); returns its metrics."""
    import ray

    from instune.stages import read_split
    from instune.train.trainer import run_ray_training

    storage = Path(spec["output"])
    shutil.rmtree(storage, ignore_errors=True)  # a run directory left by an earlier bench would be resumed
    cpus = max(1, (os.cpu_count() or 2) - 1)
    ray.init(address="local", num_cpus=cpus + 1, num_gpus=1 if spec["cuda"] else 0, include_dashboard=False)
    try:
        _, metrics_file = run_ray_training(
            loop_settings(spec), {"train": read_split(spec["rows"])}, num_workers=1, use_gpu=spec["cuda"],
            cpus_per_worker=cpus, gpus_per_worker=1 if spec["cuda"] else 0, placement_strategy="PACK",
            storage_dir=storage, run_name="bench", keep_checkpoints=1)
        return [json.loads(line) for line in metrics_file.read_text().splitlines()]
    finally:
        ray.shutdown()


def run_in_process(kind: str, spec: dict, work: Path) -> dict:
    """Run one runner in a fresh process (this script with --worker), so each starts with an empty GPU."""
    spec_file = work / f"spec-{kind}.json"
    spec_file.write_text(json.dumps(spec))
    result_file = work / f"result-{kind}.json"
    result_file.unlink(missing_ok=True)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, str(spec_file), str(result_file)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode or not result_file.is_file():
        return {"failed": proc.returncode or "no result", "wall_s": wall, "stderr_tail": proc.stderr[-3000:]}
    return {**json.loads(result_file.read_text()), "wall_s": wall}


def worker_main(kind: str, spec_file: str, result_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    if kind == "baseline":
        result = baseline_worker(spec)
    elif kind == "torchrun":
        code, metrics, stderr = torchrun_worker(spec, Path(spec["output"]))
        if code or not metrics:
            sys.exit(f"torchrun_main failed ({code}):\n{stderr}")
        result = steady(metrics, spec["real_fraction"])
    else:
        result = steady(ray_worker(spec), spec["real_fraction"])
    Path(result_file).write_text(json.dumps(result))


def resume_check(spec: dict, work: Path) -> dict:
    """Crash at step 8 of 10 under ZeRO-3 LoRA (dropout 0.1), start again, compare steps 6-7."""
    from instune.train.loop import CRASH_MARKER_ENV

    spec = dict(spec, steps=10, zero_stage=3, compile=False)
    settings = replace(loop_settings(spec), log_every=1, checkpoint_every=5,
                       method=replace(loop_settings(spec).method, dropout=0.1))
    output = work / "lora-zero3-resume"
    shutil.rmtree(output, ignore_errors=True)
    marker = work / "crash_at_step"
    marker.write_text("8")
    output.mkdir(parents=True)
    (output / "settings.json").write_text(json.dumps(settings.to_dict()))

    def attempt(env):
        subprocess.run([sys.executable, "-m", "instune.train.torchrun_main", "--settings",
                        str(output / "settings.json"), "--train-data", spec["rows"], "--output", str(output)],
                       env={**os.environ, "PYTHONPATH": str(ROOT), **env}, capture_output=True, text=True)
        return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]

    first = attempt({CRASH_MARKER_ENV: str(marker)})
    both = attempt({})
    before = {m["step"]: m["loss"] for m in first}
    after = {m["step"]: m["loss"] for m in both[len(first):]}
    compared = {s: (before.get(s), after.get(s)) for s in (6, 7)}
    same = sorted(after) == [6, 7, 8, 9, 10] and all(
        a is not None and b is not None and abs(a - b) <= 1e-5 * abs(a) for a, b in compared.values())
    return {"steps_reported": sorted(after), "losses_6_7_before_after": compared, "resumed_equal": same}


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="*", choices=list(CASES), help="default: all (--smoke: 1b-lora)")
    parser.add_argument("--runners", nargs="*", default=["baseline", "torchrun", "torchrun-unfused", "ray"],
                        choices=RUNNERS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8, help="packed rows per step")
    parser.add_argument("--baseline-examples", type=int, default=8, help="examples per baseline micro-batch")
    parser.add_argument("--attn", default="varlen_attention",
                        choices=["varlen_attention", "flex_attention", "sdpa"], help="instune's attention")
    parser.add_argument("--kernels", default="auto", choices=["auto", "liger", "none"])
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--resume-check", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help="the embedded model on the CPU: 10 steps of 2 x 128 tokens, to check the runners work")
    parser.add_argument("--workdir", default="/tmp/instune-gpu-bench")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(*args.worker)
        return

    import torch

    from instune.train.metrics import peak_flops

    cuda = torch.cuda.is_available()
    assert cuda or args.smoke, "this benchmark needs a CUDA GPU (or --smoke on the CPU)"
    work = Path(args.workdir)
    if args.smoke:
        args.cases = args.cases or ["1b-lora"]
        args.steps, args.seq_len, args.micro_batch, args.baseline_examples = 10, 128, 2, 4
        args.attn, args.no_compile = "sdpa", True  # varlen and flex kernels are CUDA-only; compiling takes minutes
    args.cases = args.cases or list(CASES)
    assert args.steps % WINDOW == 0 and args.steps > WINDOW, f"--steps: a multiple of {WINDOW} above {WINDOW}"
    peak = peak_flops(torch.device("cuda"), torch.bfloat16) if cuda else None
    results = {"device": torch.cuda.get_device_name() if cuda else "CPU", "torch": torch.__version__,
               "steps": args.steps, "seq_len": args.seq_len, "micro_batch": args.micro_batch, "cases": {}}
    out_file = work / "results.json"
    for case in args.cases:
        shape_name, method = CASES[case]
        shape = SHAPES[shape_name]
        if args.smoke:  # the embedded model's shape (instune/config.py's defaults)
            shape = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=1024, max_position_embeddings=1024,
                         tie_word_embeddings=False)
            shape_name = "smoke"
        model_dir = build_model(work / "models" / shape_name, shape, "cuda" if cuda else "cpu")
        data_dir = work / "data" / f"{shape_name}-{args.seq_len}-{args.steps * args.micro_batch}"
        if not (data_dir / "stats.json").is_file():
            bins = packed_bins(args.steps * args.micro_batch, args.seq_len, shape["vocab_size"])
            (data_dir / "stats.json").parent.mkdir(parents=True, exist_ok=True)
            (data_dir / "stats.json").write_text(json.dumps(write_data(data_dir, bins, args.seq_len)))
        stats = json.loads((data_dir / "stats.json").read_text())
        spec = {"model": str(model_dir), "method": method, "steps": args.steps, "micro_batch": args.micro_batch,
                "baseline_examples": args.baseline_examples, "lr": 1e-5 if method == "full" else 1e-4,
                "cuda": cuda, "attn": args.attn, "kernels": args.kernels, "compile": not args.no_compile,
                "rows": str(data_dir / "rows"), "examples": str(data_dir / "examples.json"),
                "real_fraction": stats["real_fraction"]}
        runs = {}
        for runner in args.runners:
            if runner.startswith("ray-zero") and method != "full":
                continue
            run_spec = dict(spec, output=str(work / "runs" / case / runner),
                            zero_stage=int(runner[-1]) if runner.startswith("ray-zero") else None)
            if runner == "torchrun-unfused":
                run_spec.update(kernels="none", attn="sdpa", compile=False)
            run = run_in_process("ray" if runner.startswith("ray") else runner.split("-")[0], run_spec, work)
            shutil.rmtree(work / "runs" / case / runner, ignore_errors=True)  # full checkpoints are large
            if "failed" not in run and peak:
                per_token = flops_per_real_token(shape, run["total_params"], run["trainable_params"],
                                                 method == "full", stats["attention_length"])
                run["mfu"] = run["real_tokens_per_s"] * per_token / peak
            runs[runner] = run
            print(case, runner, json.dumps({k: v for k, v in run.items() if k != "stderr_tail"}), flush=True)
            if "failed" in run:
                print(run["stderr_tail"], flush=True)
        results["cases"][case] = {"stats": stats, "runs": runs}
        if args.resume_check and case == args.cases[0]:
            results["resume"] = resume_check(dict(spec, method="lora"), work)
            print("resume", json.dumps(results["resume"]), flush=True)
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results: dict) -> None:
    print(f"\n{results['device']}, torch {results['torch']}; {results['steps']} steps of {results['micro_batch']} x "
          f"{results['seq_len']} packed tokens (baseline: the same examples, padded per micro-batch)")
    header = ("case", "runner", "real tokens/s", "MFU", "peak GiB", "last loss", "wall s", "vs baseline")
    lines = [header]
    for case, entry in results["cases"].items():
        runs = entry["runs"]
        base = runs.get("baseline", {})
        for runner, r in runs.items():
            if "failed" in r:
                lines.append((case, runner, f"failed ({r['failed']})", "", "", "", f"{r['wall_s']:.0f}", ""))
                continue
            ratio = ""
            if runner != "baseline" and "real_tokens_per_s" in base:
                ratio = f"{r['real_tokens_per_s'] / base['real_tokens_per_s']:.2f}x tok/s"
                if base.get("peak_memory_gib"):
                    ratio += f", {r['peak_memory_gib'] / base['peak_memory_gib']:.2f}x mem"
            lines.append((case, runner, f"{r['real_tokens_per_s']:.0f}",
                          f"{r['mfu']:.1%}" if "mfu" in r else "-", f"{r['peak_memory_gib']:.1f}",
                          f"{r['last_loss']:.4f}", f"{r['wall_s']:.0f}", ratio))
        if "torchrun" in runs and "ray" in runs and "failed" not in runs["torchrun"] and "failed" not in runs["ray"]:
            ray_ratio = runs["ray"]["real_tokens_per_s"] / runs["torchrun"]["real_tokens_per_s"]
            lines.append((case, "ray/torchrun", f"{ray_ratio:.3f}x tok/s", "", "", "", "", ""))
        fast, unfused = runs.get("torchrun", {}), runs.get("torchrun-unfused", {})
        if "last_loss" in fast and "last_loss" in unfused:
            gap = abs(fast["last_loss"] - unfused["last_loss"]) / abs(unfused["last_loss"])
            lines.append((case, "fast/unfused", f"loss {gap:.1e} rel", "", "", "", "", ""))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    if "resume" in results:
        print(f"resume under ZeRO-3: steps {results['resume']['steps_reported']}, steps 6-7 equal after resume: "
              f"{results['resume']['resumed_equal']}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
