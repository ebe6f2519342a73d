"""Correctness of the GPU-only paths, in a minute on one GPU (no Ray needed):

    python bench/gpu_checks.py

On a small Llama (4 layers, hidden 512, GQA 8/2, vocab 32,000) in bf16 with packed rows, each check compares
a fast path with the plain one on the same weights and batch:
  varlen       model.attn_implementation varlen_attention (PyTorch's varlen flash kernel, no mask) against
               SDPA with its block-diagonal mask: the loss and the gradient norm
  chunked      the loss without logits (chunked, pure PyTorch) against the logits path
  compile      each decoder layer compiled (inductor) against eager
  liger        Liger's fused linear cross-entropy and its RMSNorm/SwiGLU/RoPE against the chunked loss on the
               plain modules (skipped when liger-kernel is not installed)
Tolerance: 1e-2 relative on the loss and the gradient norm (bf16). Prints one line per check and exits
non-zero when one fails. bench/train_gpu.py measures speed; this only says the paths compute the same thing.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOLERANCE = 1e-2


def small_llama(attn: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=32000, max_position_embeddings=2048,
                         attn_implementation=attn)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to("cuda", torch.bfloat16)


def packed_batch(rows: int = 4, seq_len: int = 1024):
    """Rows of examples of random lengths (positions restart at 0), prompts ignored, padding at the end."""
    import torch

    from instune.data.tokenize import IGNORE_INDEX

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 32000, (rows, seq_len), generator=generator)
    labels, position_ids = input_ids.clone(), torch.zeros_like(input_ids)
    for r in range(rows):
        start = 0
        while start < seq_len - 64:
            length = int(torch.randint(32, 400, (1,), generator=generator))
            end = min(start + length, seq_len - 40)
            position_ids[r, start:end] = torch.arange(end - start)
            labels[r, start:start + (end - start) // 3] = IGNORE_INDEX  # the prompt
            start = end
        position_ids[r, start:] = torch.arange(seq_len - start)  # padding: its own example
        labels[r, start:] = IGNORE_INDEX
        input_ids[r, start:] = 0
    return {k: v.cuda() for k, v in (("input_ids", input_ids), ("labels", labels), ("position_ids", position_ids))}


def loss_and_grad_norm(model, batch, **loss_kwargs) -> tuple[float, float]:
    import torch

    from instune.train.loop import count_targets, token_loss_sum

    model.zero_grad(set_to_none=True)
    loss = token_loss_sum(model, batch, **loss_kwargs) / count_targets(batch)
    loss.backward()
    norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None))
    return float(loss.detach()), float(norm)


def compare(name: str, expected: tuple[float, float], got: tuple[float, float], started: float) -> bool:
    gaps = [abs(g - e) / abs(e) for e, g in zip(expected, got)]
    ok = max(gaps) <= TOLERANCE
    print(json.dumps({"check": name, "ok": ok, "loss": [expected[0], got[0]], "grad_norm": [expected[1], got[1]],
                      "relative_gap": max(gaps), "seconds": round(time.perf_counter() - started, 1)}), flush=True)
    return ok


def main() -> None:
    import torch

    from instune.train.chunked_loss import chunked_linear_cross_entropy_sum, fused_head, liger_linear_cross_entropy_sum
    from instune.train.decoder_layers import compile_layers
    from instune.train.varlen_attention import VARLEN, register_varlen_attention, varlen_parameters

    assert torch.cuda.is_available(), "these checks need a CUDA GPU"
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "varlen_attn_parameters": sorted(varlen_parameters())}), flush=True)
    batch = packed_batch()
    results = []

    started = time.perf_counter()
    sdpa = small_llama("sdpa")
    logits_path = loss_and_grad_norm(sdpa, batch)
    head = fused_head(sdpa, chunked_linear_cross_entropy_sum)
    chunked = loss_and_grad_norm(sdpa, batch, head=head)
    results.append(compare("chunked", logits_path, chunked, started))

    started = time.perf_counter()
    register_varlen_attention()
    varlen = small_llama(VARLEN)
    varlen.load_state_dict(sdpa.state_dict())
    results.append(compare("varlen", chunked, loss_and_grad_norm(
        varlen, batch, head=fused_head(varlen, chunked_linear_cross_entropy_sum), varlen=True), started))

    started = time.perf_counter()
    compiled = copy.deepcopy(sdpa)
    compile_layers(compiled)
    loss_and_grad_norm(compiled, batch, head=fused_head(compiled, chunked_linear_cross_entropy_sum))  # compiles
    results.append(compare("compile", chunked, loss_and_grad_norm(
        compiled, batch, head=fused_head(compiled, chunked_linear_cross_entropy_sum)), started))

    if importlib.util.find_spec("liger_kernel") is None:
        print(json.dumps({"check": "liger", "skipped": "liger-kernel is not installed"}), flush=True)
    else:
        from instune.train.kernels import apply_liger_blocks

        started = time.perf_counter()
        # Last: Liger's RoPE replaces the function in transformers' Llama module, for every Llama after it.
        fused = copy.deepcopy(sdpa)
        note = apply_liger_blocks(fused)
        assert note is None, note
        results.append(compare("liger", chunked, loss_and_grad_norm(
            fused, batch, head=fused_head(fused, liger_linear_cross_entropy_sum)), started))

    print(f"{sum(results)} of {len(results)} checks within {TOLERANCE:g} (relative)")
    if not all(results):
        sys.exit(1)


if __name__ == "__main__":
    main()
