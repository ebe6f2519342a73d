"""Preference training's reference: precomputed on the data stage, or computed in training. No Ray.

    python bench/preference_reference.py [--workdir /tmp/instune-pref-bench] [--pairs 256] [--micro-batch 16]
                                         [--steps 8] [--hidden 256 --layers 4]

On one model (the embedded Llama architecture built at --hidden/--layers, fp32; on a GPU when there is one):
  * reference scoring: the data stage's ReferenceLogprobs actor, called directly, over --pairs pairs
    (pairs/s, both sides);
  * a DPO training step (LoRA, AdamW) over --micro-batch pairs with dpo.reference precompute, adapter_disabled
    and model (pairs/s), so the scoring rate compares with the step that would otherwise carry it;
  * memory: what dpo.reference: model adds (a second copy of the weights: their bytes, and the process's
    resident memory or the GPU's allocated memory before and after loading it) against what precompute adds
    (two float64 columns per pair, on disk with the data).
One table, every figure from this run.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_pairs(count: int, seed: int = 0) -> list[dict]:
    from instune.default.corpus import DOMAINS
    from instune.default.pairs import wrong_answer

    rng = random.Random(seed)
    makers = list(DOMAINS.values())
    pairs = []
    for i in range(count):
        instruction, input_, output = makers[i % len(makers)](rng)
        pairs.append({"prompt": [{"role": "user", "content": f"{instruction}\n\n{input_}".strip()}],
                      "chosen": output, "rejected": wrong_answer(output, rng)})
    return pairs


def memory_bytes(device) -> int:
    import psutil
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated(device)
    return psutil.Process().memory_info().rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/instune-pref-bench")
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()

    import numpy as np
    import pyarrow as pa
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instune.base_model import tokenizer_training_texts
    from instune.data.prepare_pairs import pad_rows
    from instune.data.preference_tokenize import tokenize_pairs
    from instune.data.reference_logprobs import ReferenceLogprobs
    from instune.default.model import ensure_embedded_model
    from instune.train.methods import MethodSettings, apply_method
    from instune.train.preference_loss import PreferenceSettings
    from instune.train.preference_step import PAIR_COLUMNS, load_reference_model, pair_loss_sum

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = str(ensure_embedded_model(
        Path(args.workdir) / f"model-{args.hidden}x{args.layers}", tokenizer_training_texts(per_domain=200),
        vocab_size=1024, hidden_size=args.hidden, num_layers=args.layers, num_heads=8,
        intermediate_size=args.hidden * 8 // 3, max_position_embeddings=512, seed=0))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenized = [t for t in tokenize_pairs(make_pairs(args.pairs), tokenizer, 128, "drop")
                 if not isinstance(t, Exception)]
    sequences = [(t.chosen_input_ids, t.chosen_labels) for t in tokenized] + \
        [(t.rejected_input_ids, t.rejected_labels) for t in tokenized]

    rows = []
    scorer = ReferenceLogprobs(model_dir, pad_id=tokenizer.pad_token_id, batch_size=args.micro_batch,
                               max_batch_tokens=16384)
    scorer.logps(sequences[:4])  # warm-up
    start = time.perf_counter()
    logps = scorer.logps(sequences)
    scoring_s = time.perf_counter() - start
    rows.append(("reference scoring (prepare's actor)", len(tokenized) / scoring_s, ""))
    del scorer

    n = len(tokenized)
    table = pa.table({name: [getattr(t, name).tolist() for t in tokenized] for name in PAIR_COLUMNS})
    table = table.append_column("ref_chosen_logps", pa.array(logps[:n])).append_column(
        "ref_rejected_logps", pa.array(logps[n:]))
    table = pad_rows(table, width=128, pad_id=tokenizer.pad_token_id)

    def batch(step: int) -> dict:
        picked = [(step * args.micro_batch + i) % n for i in range(args.micro_batch)]
        part = table.take(picked)
        out = {c: torch.tensor(np.stack(part[c].to_numpy(zero_copy_only=False))).to(device) for c in PAIR_COLUMNS}
        out.update({c: torch.tensor(part[c].to_numpy()).to(device) for c in ("ref_chosen_logps", "ref_rejected_logps")})
        return out

    memory = {}
    for reference in ("precompute", "adapter_disabled", "model"):
        torch.manual_seed(0)
        policy = apply_method(AutoModelForCausalLM.from_pretrained(model_dir), MethodSettings(
            method="lora", r=16, alpha=32, dropout=0.0)).to(device)
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
        before = memory_bytes(device)
        reference_model = load_reference_model(model_dir, device, torch.float32) if reference == "model" else None
        measured = memory_bytes(device) - before
        # The copy's weights; the process's resident memory (CPU) also counts allocator and mmap effects.
        memory[reference] = sum(t.numel() * t.element_size() for t in reference_model.state_dict().values()) \
            if reference_model is not None else 0
        settings = PreferenceSettings(beta=0.1, reference=reference)

        def step(i: int) -> None:
            loss = pair_loss_sum(policy, batch(i), "dpo", settings, reference_model=reference_model)
            optimizer.zero_grad()
            (loss / args.micro_batch).backward()
            optimizer.step()

        step(0)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(1, args.steps + 1):
            step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        rows.append((f"DPO step, reference: {reference}", args.steps * args.micro_batch / seconds,
                     f"{memory[reference] / 2**20:.1f} MiB of reference weights held "
                     f"({measured / 2**20:.1f} MiB measured on {device.type})"))
        del policy, optimizer, reference_model

    parameters = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    print(f"device {device}; model {parameters / 1e6:.1f}M parameters (fp32, {parameters * 4 / 2**20:.0f} MiB); "
          f"{n} pairs of up to 128 tokens a side; micro-batch {args.micro_batch} pairs")
    print(f"{'what':42} {'pairs/s':>10}  memory")
    for what, rate, note in rows:
        print(f"{what:42} {rate:10.1f}  {note}")
    print(f"precompute stores 16 bytes per pair ({16 * n / 2**10:.1f} KiB for these {n}); scoring runs at "
          f"{rows[0][1] / rows[1][1]:.1f}x the pairs/s of a precompute training step")


if __name__ == "__main__":
    main()
