"""Per-decoder-layer speed settings: regional compilation and activation checkpointing of some layers.

Regional compilation (`train.compile`) compiles each decoder layer rather than the whole model: the layers
share one compiled graph (PyTorch treats their parameters as inputs), so compiling takes about as long as for
one layer, and the loss, the embeddings and the engines' hooks around the layers stay eager.

Checkpointing a fraction of the layers (`model.gradient_checkpointing_fraction`) trades memory for compute
in steps: each checkpointed layer keeps only its input and recomputes its forward pass in the backward pass
(about a third more compute for that layer), so checkpoint as few as fit in memory.
"""

from __future__ import annotations

from instune.train.lisa import decoder_layers


def checkpointed_layer_indices(num_layers: int, fraction: float) -> list[int]:
    """round(fraction x num_layers) layer indices (at least one), spread evenly over the stack.

    >>> checkpointed_layer_indices(8, 0.5), checkpointed_layer_indices(4, 1.0), checkpointed_layer_indices(22, 0.1)
    ([0, 2, 4, 6], [0, 1, 2, 3], [0, 11])
    """
    assert 0 < fraction <= 1, f"fraction {fraction} outside (0, 1]"
    count = max(1, round(fraction * num_layers))
    return sorted({int(i * num_layers / count) for i in range(count)})


def checkpoint_layers(model, fraction: float) -> list[int]:
    """Turn on transformers' gradient checkpointing for `fraction` of the decoder layers (after
    `model.gradient_checkpointing_enable()`, which turns it on for all); returns the indices kept on."""
    layers = decoder_layers(model)
    chosen = checkpointed_layer_indices(len(layers), fraction)
    for index, layer in enumerate(layers):
        assert hasattr(layer, "gradient_checkpointing"), f"{type(layer).__name__} is not checkpointable"
        layer.gradient_checkpointing = index in chosen
    return chosen


def compile_layers(model, backend: str = "inductor") -> int:
    """Compile each decoder layer in place (nn.Module.compile); returns how many. Tests pass another
    `backend` ("aot_eager": the same graph capture and autograd, no code generation)."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)
