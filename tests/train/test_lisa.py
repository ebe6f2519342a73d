"""LISA: the layers drawn per period, what is frozen, and what a short training run changes."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from instune.train.lisa import active_layers, decoder_layers, set_active_layers
from instune.train.loop import LoopSettings, run_training
from instune.train.methods import MethodSettings, apply_method
from instune.train.sessions import FileSession


def test_active_layers_are_a_function_of_seed_and_period():
    draws = [active_layers(period, 8, 2, seed=0) for period in range(20)]
    assert all(len(d) == 2 and len(set(d)) == 2 and all(0 <= i < 8 for i in d) for d in draws)
    assert draws == [active_layers(period, 8, 2, seed=0) for period in range(20)]
    assert len({tuple(d) for d in draws}) > 5  # periods draw different layers
    assert draws != [active_layers(period, 8, 2, seed=1) for period in range(20)]
    assert active_layers(0, 3, 5, seed=0) == [0, 1, 2]


def test_set_active_layers_freezes_the_others_and_drops_their_optimizer_state(tiny_model):
    model = apply_method(AutoModelForCausalLM.from_pretrained(str(tiny_model)), MethodSettings(method="lisa"))
    optimizer = torch.optim.AdamW(model.parameters())
    model(input_ids=torch.arange(3, 12).unsqueeze(0), labels=torch.arange(3, 12).unsqueeze(0)).loss.backward()
    optimizer.step()
    assert len(optimizer.state) == len(list(model.parameters()))
    set_active_layers(model, [1], optimizer)
    layers = decoder_layers(model)
    assert all(not p.requires_grad and p.grad is None and p not in optimizer.state for p in layers[0].parameters())
    assert all(p.requires_grad and p in optimizer.state for p in layers[1].parameters())
    assert model.get_input_embeddings().weight.requires_grad and model.lm_head.weight.requires_grad


def test_a_lisa_period_changes_only_its_layers_the_embeddings_and_the_head(tiny_model, packed_rows, tmp_path):
    settings = LoopSettings(model_path=str(tiny_model), total_steps=2, micro_batch_size=4, log_every=1,
                            lr=1e-2, warmup_ratio=0, method=MethodSettings(method="lisa", lisa_layers=1,
                                                                           lisa_period=2))
    run_training(settings, FileSession({"train": [str(packed_rows / "part-0.parquet")]}, str(tmp_path)))
    after = load_file(str(tmp_path / "checkpoints/step-00000002/trainable.safetensors"))
    before = dict(AutoModelForCausalLM.from_pretrained(str(tiny_model)).named_parameters())
    (active,) = active_layers(0, 2, 1, seed=0)
    changed = {n for n, p in before.items() if not torch.equal(p.detach(), after[n])}
    assert any(n.startswith(f"model.layers.{active}.") for n in changed)
    assert not any(n.startswith(f"model.layers.{1 - active}.") for n in changed)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= changed
