"""Which kernels a run uses: Liger's fused Triton kernels on CUDA, or PyTorch's own and the chunked loss.

`model.kernels`:
- `liger`: Liger's RMSNorm, SwiGLU and RoPE in the decoder layers of the families Liger patches (Llama,
  Mistral, Qwen2/3, Gemma, ...) and its fused linear cross-entropy for the loss. Needs a CUDA GPU and the
  `liger-kernel` package (`pip install 'instune[gpu]'`); refused before Ray starts otherwise.
- `auto` (default): `liger` where both are there, else `none`, saying in one line why.
- `none`: PyTorch's modules, and the chunked pure-PyTorch loss (chunked_loss.py), which is exact on any device.

Liger's published gains on Llama-3-8B: +20 % throughput, -60 % memory (mostly the loss).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from instune.train.chunked_loss import (LinearCrossEntropySum, chunked_linear_cross_entropy_sum,
                                        liger_linear_cross_entropy_sum)

KERNEL_CHOICES = ("auto", "liger", "none")


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


@dataclass
class KernelChoice:
    use_liger: bool
    # One line for the log when `auto` did not take Liger; None otherwise.
    fallback_note: str | None = None


def choose_kernels(requested: str, device_type: str, liger_is_installed: bool) -> KernelChoice:
    """Resolve `model.kernels` for a worker on `device_type` ("cuda", "cpu", ...)."""
    assert requested in KERNEL_CHOICES, f"model.kernels {requested!r} passed config validation"
    if requested == "none":
        return KernelChoice(False)
    if requested == "liger":
        # checks.check_attention_and_kernels refused this before Ray started; a worker without CUDA is a cluster problem.
        assert device_type == "cuda" and liger_is_installed, "model.kernels: liger needs CUDA and liger-kernel"
        return KernelChoice(True)
    if device_type != "cuda":
        return KernelChoice(False, f"model.kernels: auto uses PyTorch's kernels and the chunked loss on "
                                   f"{device_type} (Liger's kernels are Triton, CUDA only)")
    if not liger_is_installed:
        return KernelChoice(False, "model.kernels: auto uses PyTorch's kernels and the chunked loss: "
                                   "liger-kernel is not installed (pip install 'instune[gpu]')")
    return KernelChoice(True)


def loss_sum_for(choice: KernelChoice) -> LinearCrossEntropySum:
    return liger_linear_cross_entropy_sum if choice.use_liger else chunked_linear_cross_entropy_sum


def apply_liger_blocks(model) -> str | None:
    """Swap in Liger's RMSNorm, SwiGLU and RoPE on this (not yet PEFT-wrapped) model, in place; returns a
    one-line note when Liger has no kernels for its family (the loss is fused all the same).

    The loss stays ours (cross_entropy and fused_linear_cross_entropy off): Liger's would patch the model's
    forward to return a mean, and the loop needs the sum. RoPE is patched in the family's modeling module,
    so it holds for every model of that family in this process (a worker trains one).
    """
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    model_type = model.config.model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"model.kernels: Liger has no fused blocks for model type {model_type}; only the loss is fused"
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    return None
