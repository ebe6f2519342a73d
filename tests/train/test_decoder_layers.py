"""Activation checkpointing on a fraction of the layers, and regional compilation: the same step as plain."""

from __future__ import annotations

import pytest
import torch
from .train_helpers import write_tiny_model
from transformers import AutoModelForCausalLM

from instune.train.decoder_layers import checkpoint_layers, checkpointed_layer_indices, compile_layers
from instune.train.lisa import decoder_layers
from instune.train.methods import MethodSettings, apply_method


def test_checkpointed_layers_are_spread_over_the_stack():
    assert checkpointed_layer_indices(8, 0.5) == [0, 2, 4, 6]
    assert checkpointed_layer_indices(8, 0.25) == [0, 4]
    assert checkpointed_layer_indices(4, 1.0) == [0, 1, 2, 3]
    assert checkpointed_layer_indices(22, 0.01) == [0]  # at least one
    assert len(checkpointed_layer_indices(32, 0.3)) == 10


@pytest.fixture(scope="module")
def four_layer_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("four_layers"), num_layers=4)


def grads_after_backward(model_dir, method: str, prepare) -> dict:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    prepare(model)
    model = apply_method(model, MethodSettings(method=method, r=4, dropout=0.0))
    model.train()
    input_ids = torch.randint(3, 200, (2, 16))
    logits = model(input_ids=input_ids, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), input_ids[:, 1:].reshape(-1))
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def half_checkpointed(model):
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    assert checkpoint_layers(model, 0.5) == [0, 2]
    assert [layer.gradient_checkpointing for layer in decoder_layers(model)] == [True, False, True, False]


def compiled(model):
    assert compile_layers(model, backend="aot_eager") == 4


# Compiling LoRA layers (PEFT's modules inside the compiled region) is the harder case; plain layers are
# compiled with inductor in bench/gpu_checks.py. Dynamo's capture of the LoRA layers takes ~20 s on 2 busy
# cores: slow.
@pytest.mark.parametrize("method,prepare", [("full", half_checkpointed), ("lora", half_checkpointed),
                                            pytest.param("lora", compiled, marks=pytest.mark.slow)])
def test_the_gradients_are_those_of_the_plain_model(four_layer_model, method, prepare):
    torch._dynamo.reset()
    expected = grads_after_backward(four_layer_model, method, lambda m: None)
    got = grads_after_backward(four_layer_model, method, prepare)
    assert got.keys() == expected.keys()
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=name)
