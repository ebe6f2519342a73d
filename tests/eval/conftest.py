"""Tiny models for the eval tests: built from the embedded architecture, never downloaded."""

from __future__ import annotations

import pytest


def qa_records(pairs: list[tuple[str, str]]) -> list[dict]:
    """Canonical records, one user question and one assistant answer each."""
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]


ARITHMETIC = [("What is 2 + 3?", "5"), ("What is 7 + 1?", "8"), ("What is 4 + 4?", "8"), ("What is 9 - 3?", "6"),
              ("What is 10 + 12?", "22")]
UNITS = [("Convert 2 km to m.", "2000 m"), ("Convert 3 m to cm.", "300 cm"), ("Convert 1 kg to g.", "1000 g")]


@pytest.fixture(scope="package")
def ray_cluster(local_ray_cluster):
    """One local Ray cluster for the tests/eval tests that need one (the eval command's and the actor pool's):
    a cluster start costs several seconds on 2 busy cores, and the eval actors need nothing of their own."""
    with local_ray_cluster():
        yield


@pytest.fixture
def tiny_eval_sets():
    """Two in-domain sets of one domain (5 and 2 examples) and one out-of-domain set (3 examples)."""
    from instune.eval.evaluate import EvalSet

    return [EvalSet("arith_a", "arithmetic", "in_domain", qa_records(ARITHMETIC)),
            EvalSet("arith_b", "arithmetic", "in_domain", qa_records(ARITHMETIC[:2])),
            EvalSet("units", "unit_conversion", "out_of_domain", qa_records(UNITS))]


@pytest.fixture(scope="session")
def tiny_adapter_and_merged(tiny_model_dir, tmp_path_factory):
    """(LoRA adapter dir with non-zero weights on the tiny model, the same adapter merged into a full model)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("tiny_tuned")
    adapter_dir, merged_dir = root / "adapter", root / "merged"
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    # init_lora_weights=False draws B at random too, so the adapter changes the outputs; alpha/r = 16, and an MLP
    # projection beside q/v (attention alone barely moves a near-uniform tiny model), make the change large
    # enough that every set's loss moves by well over the tests' 1e-3 (by 0.017 to 0.13 on the shared model).
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(str(adapter_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    peft_model.merge_and_unload().save_pretrained(str(merged_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(merged_dir))
    return adapter_dir, merged_dir
