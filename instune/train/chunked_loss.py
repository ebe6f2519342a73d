"""Summed next-token cross-entropy straight from the last hidden states and the LM head, without the logits.

For a 128k-vocabulary model (Llama 3, Qwen 2.5) at 8 x 2,048 tokens the fp32 logits alone are 8 GiB, and
autograd keeps them until the backward pass. Here the head's matrix product runs over a few hundred rows at
a time, and each chunk's gradients (softmax minus one-hot, times the weight and the hidden rows) are
computed at once, in the forward pass, as Liger's fused linear cross-entropy does: the backward pass only
scales them. Peak memory is one chunk's logits, plus the weight's gradient when the head trains.

The result is the SUM over the rows given (the loop passes only target rows, so prompt and padding
positions cost no head FLOPs at all); the loop divides by the global count of target tokens, so the
normalisation over micro-batches and workers stays exact.

`head_loss` lets the loss run inside the LM head's own call: DeepSpeed ZeRO-3 gathers the head's weight in
that module's forward and backward hooks, and they only fire for the head's own output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Each chunk's fp32 logits stay under this (rows = budget / (4 bytes x vocab)): 256 MiB is ~520 rows of a
# 128k vocabulary, enough rows for the GPU's matrix units and far below the whole batch's logits.
CHUNK_LOGITS_BYTES = 256 * 2**20

# (hidden [N, H], weight [V, H], bias [V] or None, targets [N], softcap or None) -> summed loss (scalar).
LinearCrossEntropySum = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, float | None],
                                 torch.Tensor]


def rows_per_chunk(vocab_size: int, budget_bytes: int = CHUNK_LOGITS_BYTES) -> int:
    """Rows whose fp32 logits fit in `budget_bytes`."""
    return max(1, budget_bytes // (4 * vocab_size))


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype the head's matrix product runs in: autocast's when it is on (as it would be for nn.Linear)."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


def _chunks(hidden, weight, bias, targets, chunk_rows: int, softcap: float | None,
            need: tuple[bool, bool, bool]):
    """(summed loss in fp32, grad of hidden, grad of weight in fp32, grad of bias in fp32); a gradient is
    None where `need` says it is not wanted. Runs without autograd and without autocast."""
    dtype = compute_dtype(hidden)
    device_type = hidden.device.type
    with torch.no_grad(), torch.autocast(device_type, enabled=False):
        h = hidden.to(dtype)
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        need_h, need_w, need_b = need
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, h.size(0), chunk_rows):
            rows = h[start:start + chunk_rows]
            chunk_targets = targets[start:start + chunk_rows]
            # Upcast as the logits path does (F.cross_entropy on .float() logits).
            logits = F.linear(rows, w, b).float()
            if softcap is not None:  # Gemma 2's final_logit_softcapping: cap * tanh(logits / cap)
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, chunk_targets[:, None]).squeeze(1)
            total += (lse - picked).sum()
            if not (need_h or need_w or need_b):
                continue
            # d loss / d logits = softmax - one_hot, computed in place over the chunk's logits buffer.
            grad_logits = logits.sub_(lse[:, None]).exp_()
            grad_logits[torch.arange(rows.size(0), device=rows.device), chunk_targets] -= 1
            if softcap is not None:
                grad_logits *= 1 - capped * capped
            if need_b:
                grad_b += grad_logits.sum(0)
            grad_logits = grad_logits.to(dtype)
            if need_h:
                grad_h[start:start + chunk_rows] = grad_logits @ w
            if need_w:
                grad_w += (grad_logits.t() @ rows).float()
    return total, grad_h, grad_w, grad_b


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows, softcap):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        total, grad_h, grad_w, grad_b = _chunks(hidden, weight, bias, targets, chunk_rows, softcap, need)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_h, grad_w, grad_b)))
        ctx.have = tuple(g is not None for g in (grad_h, grad_w, grad_b))
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grads = []
        for saved, have, dtype in zip(ctx.saved_tensors, ctx.have, ctx.dtypes):
            grads.append((saved * grad_output).to(dtype) if have else None)
        return (*grads, None, None, None)


def chunked_linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                     targets: torch.Tensor, softcap: float | None = None,
                                     chunk_rows: int | None = None) -> torch.Tensor:
    """Sum over rows of cross_entropy(hidden @ weight.T + bias, targets), one chunk of rows at a time.

    `hidden` [N, H] holds only rows with a target (no ignore_index); the result is fp32, as the logits path's.
    """
    chunk_rows = chunk_rows or rows_per_chunk(weight.size(0))
    if not torch.is_grad_enabled():
        return _chunks(hidden, weight, bias, targets, chunk_rows, softcap, (False, False, False))[0]
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows, softcap)


def liger_linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                   targets: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """Liger's fused (Triton) linear cross-entropy, summed; CUDA only. Inputs are cast to the dtype the head
    would run in (autocast's), and the weight's gradient is accumulated in fp32 over Liger's chunks."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    from instune.data.tokenize import IGNORE_INDEX

    if hidden.size(0) == 0:  # a micro-batch without a target token: zero, still part of the graph
        return (hidden.sum() * 0).float() + (weight.sum() * 0).float()
    dtype = compute_dtype(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        return liger_fused_linear_cross_entropy(
            hidden.to(dtype), weight.to(dtype), targets, bias=bias.to(dtype) if bias is not None else None,
            ignore_index=IGNORE_INDEX, reduction="sum", softcap=softcap,
            accum_dtype=torch.float32 if weight.requires_grad else None).float()


@dataclass
class FusedHead:
    """The model's LM head (a plain nn.Linear) and the summed cross-entropy that replaces its logits."""

    module: torch.nn.Linear
    loss_sum: LinearCrossEntropySum
    softcap: float | None = None


def fused_head(model, loss_sum: LinearCrossEntropySum) -> FusedHead | None:
    """The FusedHead of `model` (unwrapped: no DDP or DeepSpeed engine around it), or None where its head is
    not a plain linear layer (a LoRA-wrapped head, a head in PEFT's modules_to_save) or the model scales its
    logits in a way this loss does not reproduce: those keep the logits path."""
    head = model.get_output_embeddings()
    config = model.config
    if type(head) is not torch.nn.Linear or getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return None
    return FusedHead(head, loss_sum, getattr(config, "final_logit_softcapping", None))


@contextlib.contextmanager
def head_loss(head: FusedHead, targets: torch.Tensor, length: int, ignore_index: int):
    """While open, the head's forward returns the summed loss of the positions whose `targets` (the labels
    shifted left, [B, length - 1]) are not `ignore_index`; yields a list that receives that output.

    The output is read by a forward hook, after the hooks engines add (ZeRO-3 wraps the outputs it will
    gather the weight for in the backward pass); what the model does with its "logits" afterwards is unused.
    """
    module = head.module
    keep = targets != ignore_index

    def loss_forward(hidden):
        # Prompt tuning prepends virtual tokens: the batch's positions are the last `length`; the last one
        # predicts nothing.
        rows = hidden[:, -length:][:, :-1][keep]
        return head.loss_sum(rows, module.weight, module.bias, targets[keep], head.softcap)

    outputs: list[torch.Tensor] = []
    hook = module.register_forward_hook(lambda _module, _args, output: outputs.append(output))
    patched_before = module.__dict__.get("forward")  # an instance-level forward someone else set
    module.forward = loss_forward
    try:
        yield outputs
    finally:
        if patched_before is None:
            del module.forward  # back to the class's forward
        else:
            module.forward = patched_before
        hook.remove()
