"""Reference-model scoring on a GPU, without Ray: the data stage's `ReferenceScorer` actor, called directly.

    python bench/score_gpu.py [--workdir /tmp/instune-gpu-bench] [--records 2048] [--batch-size 64]
                              [--max-batch-tokens 16384]

Two checks on one run:
  * the embedded model (fp32) scores the same conversations on the CPU and on the GPU: perplexity and IFD
    must agree to 1e-3 (relative), so the GPU path of the actor computes what the CPU path computes;
  * the ~1B Llama of bench/train_gpu.py (built if missing, loaded in its saved bf16) scores `--records`
    conversations with IFD (two forward passes each): records/s and answer tokens/s.
The conversations are the embedded corpus's domains (instruction, input, answer), tokenized with the embedded
tokenizer and its chat template.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def conversations(count: int, seed: int = 0) -> list[list[dict]]:
    from instune.default.corpus import DOMAINS

    rng = random.Random(seed)
    makers = list(DOMAINS.values())
    out = []
    for i in range(count):
        instruction, input_, output = makers[i % len(makers)](rng)
        out.append([{"role": "user", "content": f"{instruction}\n{input_}".strip()},
                    {"role": "assistant", "content": output}])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/instune-gpu-bench")
    parser.add_argument("--records", type=int, default=2048)
    # data.score's defaults. On one H200: 199 records/s at --batch-size 32, 773 at 128.
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    args = parser.parse_args()

    import numpy as np
    import torch

    from instune.base_model import tokenizer_training_texts
    from instune.data.score import ReferenceScorer
    from instune.default.model import ensure_embedded_model
    from train_gpu import build_model

    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    work = Path(args.workdir)
    small = ensure_embedded_model(work / "embedded", tokenizer_training_texts(), vocab_size=1024, hidden_size=128,
                                  num_layers=4, num_heads=4, intermediate_size=344, max_position_embeddings=1024,
                                  seed=0)
    convs = conversations(args.records)

    def scorer(model_dir: Path, device: str) -> ReferenceScorer:
        s = ReferenceScorer(str(model_dir), str(small), "ifd", max_length=1024, batch_size=args.batch_size,
                            max_batch_tokens=args.max_batch_tokens)
        s.device = torch.device(device)
        s.model = s.model.to(s.device)
        return s

    cpu = scorer(small, "cpu").scores(convs[:256])
    gpu = scorer(small, "cuda").scores(convs[:256])
    assert [bool(c) for c in cpu] == [bool(g) for g in gpu], "CPU and GPU scored different conversations"
    worst = max(abs(c[k] - g[k]) / abs(c[k]) for c, g in zip(cpu, gpu) if c for k in ("perplexity", "ifd"))
    print(f"embedded model, 256 conversations: CPU vs GPU worst relative difference {worst:.2e} "
          f"({'ok' if worst < 1e-3 else 'MISMATCH'})", flush=True)

    big = scorer(build_model(work / "model"), "cuda")
    big.scores(convs[:args.batch_size])  # warm-up: kernels, allocator
    torch.cuda.synchronize()
    started = time.perf_counter()
    scores = big.scores(convs)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    answer_tokens = sum(len(big.tokenizer(c[1]["content"])["input_ids"]) for c in convs)
    ifd = np.array([s["ifd"] for s in scores if s])
    print(f"{torch.cuda.get_device_name()}: 1.1B reference ({next(big.model.parameters()).dtype}), IFD over "
          f"{len(convs)} conversations in {seconds:.1f} s: {len(convs) / seconds:.0f} records/s, "
          f"~{answer_tokens / seconds:.0f} answer tokens/s; {len(ifd)} scored, median IFD {np.median(ifd):.3f}")


if __name__ == "__main__":
    main()
