"""Which parameters each method trains, and the head dropout hook."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from instune.train.methods import MethodSettings, add_head_dropout, apply_method, count_parameters, saved_parameters


def load(path):
    return AutoModelForCausalLM.from_pretrained(str(path))


def trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("method, marker", [("lora", "lora_"), ("ia3", "ia3_l"), ("prefix", "prompt_encoder"),
                                            ("prompt", "prompt_encoder")])
def test_peft_methods_train_only_their_own_parameters(tiny_model, method, marker):
    model = apply_method(load(tiny_model), MethodSettings(method=method, r=4, num_virtual_tokens=3))
    names = trainable_names(model)
    assert names and all(marker in n for n in names)
    trainable, total = count_parameters(model)
    assert 0 < trainable < total / 5
    assert [n for n, _ in saved_parameters(model, method)] == names


def test_prompt_tuning_learns_one_embedding_per_virtual_token(tiny_model):
    model = apply_method(load(tiny_model), MethodSettings(method="prompt", num_virtual_tokens=3))
    (table,) = [p for p in model.parameters() if p.requires_grad]
    assert tuple(table.shape) == (3, 32)


def test_lora_modules_to_save_trains_a_copy_of_the_head(tiny_model):
    model = apply_method(load(tiny_model), MethodSettings(method="lora", r=4, modules_to_save=["lm_head"]))
    assert any("lm_head.modules_to_save" in n for n in trainable_names(model))


def test_rslora_and_dora_change_the_adapter(tiny_model):
    plain = apply_method(load(tiny_model), MethodSettings(method="lora", r=4, alpha=8))
    rs = apply_method(load(tiny_model), MethodSettings(method="lora", r=4, alpha=8, use_rslora=True))
    dora = apply_method(load(tiny_model), MethodSettings(method="lora", r=4, use_dora=True))
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert plain.get_submodule(q).scaling["default"] == pytest.approx(8 / 4)
    assert rs.get_submodule(q).scaling["default"] == pytest.approx(8 / 4 ** 0.5)
    assert any("lora_magnitude_vector" in n for n in trainable_names(dora))


def test_bitfit_trains_biases_only(tiny_model):
    model = apply_method(load(tiny_model), MethodSettings(method="bitfit"))
    names = trainable_names(model)
    assert names and all(n.endswith(".bias") for n in names)
    assert len(names) == 2 * (4 + 3)  # 2 layers x (q, k, v, o + gate, up, down)


def test_full_and_lisa_save_every_weight(tiny_model):
    for method in ("full", "lisa"):
        model = apply_method(load(tiny_model), MethodSettings(method=method))
        assert len(saved_parameters(model, method)) == len(list(model.parameters()))


def test_head_dropout_drops_the_lm_head_input_only_while_training(tiny_model):
    model = load(tiny_model)
    add_head_dropout(model, 0.9)
    ids = torch.arange(3, 19).unsqueeze(0)
    model.train()
    torch.manual_seed(0)
    first = model(input_ids=ids).logits
    second = model(input_ids=ids).logits
    assert not torch.allclose(first, second)
    seen = {}
    model.get_output_embeddings().register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    model(input_ids=ids)
    zeros = float((seen["x"] == 0).float().mean())
    assert 0.8 < zeros < 0.97  # about 90% of the features dropped
    model.eval()
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert torch.allclose(model(input_ids=ids).logits, load(tiny_model).eval()(input_ids=ids).logits)
