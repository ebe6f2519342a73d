"""The training loop on preference pairs: DPO starts at log 2 from a fresh LoRA adapter, the adapter-less and
the second-model references train exactly as the precomputed one, metrics per step, held-out reward accuracy;
and, under torchrun, the same update on 1 and 2 workers, DDP and ZeRO."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from .train_helpers import arithmetic_pairs, read_metrics, two_worker_plan, write_pairs, write_tiny_model

from instune.train.loop import LoopSettings, run_training
from instune.train.methods import MethodSettings
from instune.train.preference_loss import PreferenceSettings
from instune.train.sessions import FileSession

STEP_1 = "checkpoints/step-00000001/trainable.safetensors"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def pair_files(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pairs")
    train = write_pairs(model_dir, tmp / "train", arithmetic_pairs([(a, b) for a in range(1, 5) for b in range(1, 5)]))
    validation = write_pairs(model_dir, tmp / "validation", arithmetic_pairs([(5, 2), (6, 1), (7, 3), (2, 8)]))
    return {"train": [train], "validation": [validation]}


def settings(model_dir, **changes) -> LoopSettings:
    base = dict(model_path=str(model_dir), total_steps=6, lr=2e-2, micro_batch_size=4, log_every=1, eval_every=3,
                warmup_ratio=0.0, objective="dpo", preference=PreferenceSettings(beta=0.5),
                method=MethodSettings(method="lora", r=4, alpha=8, dropout=0.0))
    return LoopSettings(**{**base, **changes})


def test_dpo_trains_from_log_2_and_reports_its_metrics(model_dir, pair_files, tmp_path):
    run_training(settings(model_dir), FileSession(pair_files, str(tmp_path / "run")))
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    # A fresh LoRA adapter adds nothing: the policy is its reference, every reward 0 and the loss log 2.
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics[0]["rewards/chosen"] == pytest.approx(0, abs=1e-5) == metrics[0]["rewards/margin"]
    for key in ("rewards/rejected", "rewards/accuracy", "logps/chosen", "logps/rejected"):
        assert all(key in m for m in metrics), key
    assert metrics[-1]["loss"] < math.log(2) and metrics[-1]["rewards/margin"] > 0
    assert 0 <= metrics[-1]["rewards/accuracy"] <= 1
    # Held-out pairs, scored at steps 3 and 6.
    evals = [m for m in metrics if "eval_loss" in m]
    assert [m["step"] for m in evals] == [3, 6]
    assert {"eval_rewards/accuracy", "eval_rewards/margin"} <= set(evals[0])


@pytest.mark.parametrize("reference", ["adapter_disabled", "model"])
def test_references_computed_in_training_train_as_the_precomputed_one(model_dir, pair_files, tmp_path, reference):
    precomputed = tmp_path / "precomputed"
    # All 16 pairs in every step, so the losses of successive steps compare.
    run_training(settings(model_dir, total_steps=3, micro_batch_size=16), FileSession(pair_files, str(precomputed)))
    other = tmp_path / reference
    run_training(settings(model_dir, total_steps=3, micro_batch_size=16,
                          preference=PreferenceSettings(beta=0.5, reference=reference)),
                 FileSession({"train": pair_files["train"]}, str(other)))
    losses = [m["loss"] for m in read_metrics(precomputed)]
    assert [m["loss"] for m in read_metrics(other)] == pytest.approx(losses, abs=1e-5)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("objective", ["ipo", "cdpo", "simpo", "orpo"])
def test_every_objective_trains_through_the_loop(model_dir, pair_files, tmp_path, objective):
    run_training(settings(model_dir, total_steps=3, micro_batch_size=16, objective=objective, eval_every=None),
                 FileSession({"train": pair_files["train"]}, str(tmp_path / objective)))
    losses = [m["loss"] for m in read_metrics(tmp_path / objective)]
    assert len(losses) == 3 and losses[-1] < losses[0]


# One SGD step at lr 1 without clipping: the weights move by exactly the gradient, which must not depend on how
# the pairs are spread over workers.
ONE_SGD_STEP = dict(total_steps=1, eval_every=None, method=MethodSettings(method="full"), optimizer="sgd", lr=1.0,
                    max_grad_norm=1e9)
NUMBERS = [(a, b) for a in range(1, 5) for b in range(1, 5)]  # 16 pairs


@two_worker_plan("preference")
def preference_on_two_workers(model, directory):
    """All 16 pairs in one step on 2 workers x 8, DDP and ZeRO-2, full fine-tuning; and LoRA three ways to the
    same reference: precompute under ZeRO-3, the adapter switched off under ZeRO-2 and under DDP."""
    train = [write_pairs(model, directory / "pairs", arithmetic_pairs(NUMBERS))]
    common = dict(micro_batch_size=8, **ONE_SGD_STEP)
    lora = dict(total_steps=3, micro_batch_size=8, eval_every=None)
    disabled = PreferenceSettings(beta=0.5, reference="adapter_disabled")
    return [{"settings": settings(model, **common), "train": train, "output": directory / "ddp"},
            {"settings": settings(model, **common, strategy="deepspeed", zero_stage=2),
             "train": train, "output": directory / "zero"},
            {"settings": settings(model, **lora, strategy="deepspeed", zero_stage=3),
             "train": train, "output": directory / "lora_zero3"},
            {"settings": settings(model, **lora, strategy="deepspeed", zero_stage=2, preference=disabled),
             "train": train, "output": directory / "lora_zero2_disabled"},
            {"settings": settings(model, **lora, preference=disabled),
             "train": train, "output": directory / "lora_ddp_disabled"}]


@pytest.mark.slow
def test_one_and_two_workers_ddp_and_zero_take_the_same_steps(tiny_model, two_worker_runs, tmp_path):
    """All 16 pairs in one optimizer step: 1 worker x 16, 2 workers x 8 (DDP, and ZeRO-2), full fine-tuning;
    LoRA under ZeRO-3 and ZeRO-2 and DDP with the precomputed and the adapter-less reference (the 2-worker runs
    are preference_on_two_workers, in the session's torchrun launch). A DPO run killed at step 3 and resumed is
    tests/train/test_trainer.py's, through Ray Train (what `instune train` runs), where it also ends with the
    unbroken run's weights."""
    runs = two_worker_runs["preference"]
    one = tmp_path / "one"
    run_training(settings(tiny_model, micro_batch_size=16, **ONE_SGD_STEP),
                 FileSession({"train": [str(runs / "pairs" / "part-0.parquet")]}, str(one)))
    # LoRA: same data, seeds and updates whichever the reference, so the same losses.
    lora_losses = [[m["loss"] for m in read_metrics(runs / name)]
                   for name in ("lora_zero3", "lora_zero2_disabled", "lora_ddp_disabled")]
    assert lora_losses[0][0] == pytest.approx(math.log(2), abs=1e-5) and lora_losses[0][-1] < lora_losses[0][0]
    assert lora_losses[1] == pytest.approx(lora_losses[0], abs=1e-5)
    assert lora_losses[2] == pytest.approx(lora_losses[0], abs=1e-5)
    expected = load_file(one / STEP_1)
    assert read_metrics(one)[0]["grad_norm"] > 1e-2  # a step that moves the weights
    for name in ("ddp", "zero"):
        got = load_file(runs / name / STEP_1)
        for key, value in expected.items():
            assert torch.allclose(got[key].float(), value.float(), atol=1e-5), (name, key)
        assert [m["loss"] for m in read_metrics(runs / name)] == \
            pytest.approx([m["loss"] for m in read_metrics(one)], abs=1e-5)


def test_the_dpo_section_and_objective_reach_the_loop_as_a_sweep_trial_sets_them():
    from instune.config import validate_config
    from instune.train.trainer import training_run

    tree = {"name": "t", "output_dir": "/tmp/t", "data": {"sources": [{"name": "a", "path": "x"}]},
            "train": {"objective": "ipo"}, "dpo": {"beta": 0.3, "label_smoothing": 0.2, "simpo_beta": 2.5,
                                                   "simpo_gamma_beta_ratio": 0.6,
                                                   "orpo_lambda": 0.4, "reference": "model",
                                                   "reference_model_path": "/models/ref"}}
    run = training_run(validate_config(tree), "/models/base", rows=100)
    assert run.loop.objective == "ipo"
    assert run.loop.preference == PreferenceSettings(beta=0.3, label_smoothing=0.2, simpo_beta=2.5,
                                                     simpo_gamma_beta_ratio=0.6, orpo_lambda=0.4,
                                                     reference="model", reference_model_path="/models/ref")
    # Through the dict the Ray workers receive.
    assert LoopSettings.from_dict(run.loop.to_dict()) == run.loop
