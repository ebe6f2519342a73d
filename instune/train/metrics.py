"""Throughput accounting: model FLOPs per token, the device's peak, and peak memory."""

from __future__ import annotations

import resource
import sys

import torch

# Dense bf16/fp16 tensor-core peaks (no sparsity), FLOP/s, from the vendors' datasheets.
PEAK_FLOPS_16BIT = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is lower (756e12), matched first below
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak FLOP/s for `dtype`, or None where unknown (CPUs: MFU is not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        peak = 756e12
    else:
        peak = next((v for k, v in PEAK_FLOPS_16BIT.items() if k in name), None)
    if peak and dtype == torch.float32:
        peak /= 2  # TF32 tensor-core peak is half the 16-bit one
    return peak


def flops_per_token(total_params: int, trainable_params: int, full: bool) -> float:
    """Training FLOPs per token: forward 2N, backward 2N for activations plus 2N_trainable for weights.

    For full fine-tuning this is the usual 6N; for PEFT only trainable weights need weight gradients.
    Attention's sequence-length term (PaLM's 12·layers·hidden·seq_len) is left out: packed rows attend only
    within each example, so the full-row term would overstate the work (at 2048 tokens by a sixth for a
    1.1B Llama); MFU here is therefore a slight underestimate.
    """
    return 4 * total_params + 2 * (total_params if full else trainable_params)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
