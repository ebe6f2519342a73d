"""LISA (Pan et al. 2024, "Layerwise Importance Sampled AdamW"): full fine-tuning where only a few randomly
drawn decoder layers train at a time, re-drawn every period; everything outside the decoder layers
(embeddings, final norm, LM head) always trains. Memory for optimizer state is that of the active layers.
"""

from __future__ import annotations

import numpy as np
import torch


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's stack of decoder layers (the ModuleList as long as config.num_hidden_layers)."""
    n = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise AssertionError(f"no list of {n} decoder layers found in {type(model).__name__}")


def active_layers(period: int, num_layers: int, layers_per_period: int, seed: int) -> list[int]:
    """The layers trainable during `period`; a function of (seed, period) only, so every worker draws the
    same layers without communicating and a resumed run draws what the interrupted one did."""
    rng = np.random.default_rng([seed, period])
    k = min(layers_per_period, num_layers)
    return sorted(int(i) for i in rng.choice(num_layers, size=k, replace=False))


def set_active_layers(model, active: list[int], optimizer: torch.optim.Optimizer) -> None:
    """Make only `active` decoder layers trainable; frozen layers lose their gradients and optimizer state
    (so they hold no Adam moments), and a layer drawn again later restarts its moments from zero."""
    for index, layer in enumerate(decoder_layers(model)):
        trainable = index in active
        for p in layer.parameters():
            p.requires_grad_(trainable)
            if not trainable:
                p.grad = None
                optimizer.state.pop(p, None)
