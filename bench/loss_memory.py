"""Peak memory and time of one loss forward + backward: the logits path against the chunked loss (no logits).

    python bench/loss_memory.py [--tokens 2048] [--hidden 1024] [--vocab 128256] [--device cpu]

The LM head of a 128k-vocabulary model (Llama 3) over `--tokens` target tokens, fp32, each path in its own
process: the logits path (F.linear, then cross-entropy on the [tokens, vocab] logits, as transformers does)
and chunked_loss.chunked_linear_cross_entropy_sum. Peak memory is the process's peak resident set above its
size once the inputs exist (CPU), or torch.cuda.max_memory_allocated above the inputs (GPU). Prints one
table with the ratios of the two.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(path: str, tokens: int, hidden: int, vocab: int, device: str) -> dict:
    import torch
    import torch.nn.functional as F

    from instune.train.chunked_loss import chunked_linear_cross_entropy_sum
    from instune.train.metrics import peak_memory_bytes

    torch.manual_seed(0)
    dev = torch.device(device)
    h = torch.randn(tokens, hidden, device=dev, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=dev) * hidden**-0.5).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = peak_memory_bytes(dev)
    started = time.perf_counter()
    if path == "logits":
        loss = F.cross_entropy(F.linear(h, w).float(), targets, reduction="sum")
    else:
        loss = chunked_linear_cross_entropy_sum(h, w, None, targets)
    loss.backward()
    value = float(loss.detach())
    seconds = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda" else peak_memory_bytes(dev)) - before
    return {"loss": value, "seconds": seconds, "peak_extra_gib": peak / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--path", choices=["logits", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.path:
        print(json.dumps(measure(args.path, args.tokens, args.hidden, args.vocab, args.device)))
        return
    results = {}
    for path in ("logits", "chunked"):
        done = subprocess.run([sys.executable, __file__, "--path", path, "--tokens", str(args.tokens), "--hidden",
                               str(args.hidden), "--vocab", str(args.vocab), "--device", args.device],
                              capture_output=True, text=True, check=True)
        results[path] = json.loads(done.stdout.strip().splitlines()[-1])
    logits, chunked = results["logits"], results["chunked"]
    print(f"{args.device}; {args.tokens} target tokens x hidden {args.hidden} -> vocab {args.vocab}, fp32; "
          f"forward + backward of the summed loss")
    print("| path    | peak extra GiB | seconds | loss |")
    print("|---------|----------------|---------|------|")
    for name, r in results.items():
        print(f"| {name:<7} | {r['peak_extra_gib']:14.2f} | {r['seconds']:7.1f} | {r['loss']:.2f} |")
    print(f"chunked/logits: memory {chunked['peak_extra_gib'] / logits['peak_extra_gib']:.3f}x, "
          f"time {chunked['seconds'] / logits['seconds']:.2f}x, loss relative gap "
          f"{abs(chunked['loss'] - logits['loss']) / abs(logits['loss']):.1e}")


if __name__ == "__main__":
    main()
