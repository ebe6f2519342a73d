"""A micro-batch of pairs through a real LoRA policy on the embedded model: at the start the policy is the
reference, so DPO's loss is exactly log 2; the adapter-less reference equals the precomputed one; a few steps
raise the reward accuracy of the pairs trained on."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from instune.base_model import tokenizer_training_texts
from instune.data.prepare_pairs import pad_rows
from instune.data.preference_tokenize import tokenize_pairs
from instune.data.reference_logprobs import sequence_logps
from instune.default.model import ensure_embedded_model
from instune.train.methods import MethodSettings, apply_method
from instune.train.preference_loss import PreferenceSettings
from instune.train.preference_step import PAIR_COLUMNS, count_pairs, pair_loss_sum, reference_logps, stacked

WIDTH = 48


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(ensure_embedded_model(
        tmp_path_factory.mktemp("model") / "m", tokenizer_training_texts(per_domain=30), vocab_size=400,
        hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=256, seed=0))


@pytest.fixture(scope="module")
def batch(model_dir):
    """Four pairs (right answer vs off by one) as the loop gets them, with precomputed reference log-probs."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs = [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "chosen": str(a + b),
              "rejected": f"{a + b + 1} maybe"} for a, b in ((1, 2), (3, 4), (5, 1), (2, 2))]
    tokenized = tokenize_pairs(pairs, tokenizer, WIDTH, "drop")
    table = pa.table({name: [getattr(t, name).tolist() for t in tokenized] for name in PAIR_COLUMNS})
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for side in ("chosen", "rejected"):
        sequences = [(getattr(t, f"{side}_input_ids"), getattr(t, f"{side}_labels")) for t in tokenized]
        table = table.append_column(f"ref_{side}_logps", pa.array(sequence_logps(base, sequences, 0, "cpu")))
    table = pad_rows(table, width=WIDTH, pad_id=tokenizer.pad_token_id)
    out = {name: torch.tensor(np.stack(table[name].to_numpy(zero_copy_only=False))) for name in PAIR_COLUMNS}
    out.update({name: torch.tensor(table[name].to_numpy()) for name in ("ref_chosen_logps", "ref_rejected_logps")})
    return out


def lora_policy(model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return apply_method(model, MethodSettings(method="lora", r=4, alpha=8, dropout=0.0))


def test_pairs_stack_chosen_then_rejected_in_one_forward_and_trim_unused_columns(batch):
    input_ids, labels = stacked(batch)
    assert input_ids.shape[0] == 8 and count_pairs(batch) == 4
    assert torch.equal(input_ids[4], batch["rejected_input_ids"][0, :input_ids.shape[1]])
    assert input_ids.shape[1] < WIDTH and (labels[:, -1] != -100).any()


def test_a_fresh_lora_policy_is_its_reference_so_dpo_starts_at_log_2(model_dir, batch):
    policy = lora_policy(model_dir)
    metrics = {}
    loss = pair_loss_sum(policy, batch, "dpo", PreferenceSettings(beta=0.1), metrics=metrics)
    assert loss.item() / 4 == pytest.approx(math.log(2), abs=1e-4)
    assert metrics["pairs"] == 4 and metrics["rewards/chosen"] == pytest.approx(0, abs=1e-4)
    # The adapter-less policy gives the precomputed values, with no second copy of the model.
    with torch.no_grad():
        for parameter_name, parameter in policy.named_parameters():
            if "lora_B" in parameter_name:
                parameter.add_(0.05)  # the policy now differs from its base
    input_ids, labels = stacked(batch)
    disabled = reference_logps(batch, "adapter_disabled", policy, None, input_ids, labels)
    precomputed = reference_logps(batch, "precompute", policy, None, input_ids, labels)
    assert disabled.tolist() == pytest.approx(precomputed.tolist(), abs=1e-4)
    moved = pair_loss_sum(policy, batch, "dpo", PreferenceSettings(beta=0.1))
    assert abs(moved.item() / 4 - math.log(2)) > 1e-4


@pytest.mark.parametrize("objective", ["dpo", "simpo", "orpo"])
def test_a_few_steps_lower_the_loss_and_dpo_and_simpo_widen_the_margin(model_dir, batch, objective):
    policy = lora_policy(model_dir)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=3e-2)
    settings = PreferenceSettings(beta=0.5)  # SimPO keeps its own simpo_beta (2.0)
    first, last, losses = {}, {}, []
    for step in range(12):
        loss = pair_loss_sum(policy, batch, objective, settings, metrics=first if step == 0 else {})
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = pair_loss_sum(policy, batch, objective, settings, metrics=last).item()
    assert final < losses[0]
    if objective != "orpo":  # ORPO's SFT term on the chosen side dominates its loss at λ = 0.1
        assert last["rewards/margin"] > first["rewards/margin"] + 0.5
    if objective == "dpo":
        assert last["rewards/accuracy"] >= max(first["rewards/accuracy"], 3)
