"""DeepSpeed strategy: the config built from our settings, and an exact resume under ZeRO-3 with offload."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from ..train_helpers import read_metrics, two_worker_plan, write_packed_rows

from instune.train.loop import LoopSettings
from instune.train.methods import MethodSettings
from instune.train.strategies.deepspeed import deepspeed_config, merge, uses_cpu_adam


def build(**kw):
    args = dict(zero_stage=2, offload_optimizer=False, offload_params=False, micro_batch_size=4, grad_accum=2,
                max_grad_norm=1.0, dtype="float32", pin_memory=False, extra={})
    return deepspeed_config(**{**args, **kw})


def test_config_carries_our_settings():
    config = build(zero_stage=3, offload_optimizer=True, offload_params=True, dtype="bfloat16")
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 2
    assert config["gradient_clipping"] == 1.0
    assert config["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                                           "offload_param": {"device": "cpu", "pin_memory": False}}
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    assert "offload_optimizer" not in build()["zero_optimization"]


def test_raw_keys_merge_over_the_built_ones():
    config = build(extra={"zero_optimization": {"overlap_comm": True, "stage": 1}, "wall_clock_breakdown": True})
    assert config["zero_optimization"] == {"stage": 1, "overlap_comm": True}
    assert config["wall_clock_breakdown"] is True and config["gradient_clipping"] == 1.0
    assert merge({"a": {"b": 1}}, {"a": {"c": 2}}) == {"a": {"b": 1, "c": 2}}


def test_cpu_adam_only_for_offloaded_optimizer_state_unless_turned_off():
    assert not uses_cpu_adam(build())
    assert uses_cpu_adam(build(offload_optimizer=True))
    assert not uses_cpu_adam(build(offload_optimizer=True, extra={"zero_force_ds_cpu_optimizer": False}))


@two_worker_plan("zero3_offload_resume")
def zero3_offload_resume(model, directory):
    """ZeRO-3 with offload, one step and then again to two (the second run resumes from the first's checkpoint),
    and two DDP steps in one run, on 2 workers."""
    rows = write_packed_rows(directory / "rows", 8, seed=4)
    files = [str(rows / "part-0.parquet")]
    base = dict(model_path=str(model), micro_batch_size=4, log_every=1, lr=1e-2, warmup_ratio=0.0,
                method=MethodSettings(method="lora", r=4, dropout=0.0))
    zero3 = dict(strategy="deepspeed", zero_stage=3, offload_optimizer=True, offload_params=True,
                 deepspeed={"zero_force_ds_cpu_optimizer": False})
    return [
        {"settings": LoopSettings(**base, **zero3, total_steps=1), "train": files, "output": directory / "zero3"},
        {"settings": LoopSettings(**base, **zero3, total_steps=2), "train": files, "output": directory / "zero3"},
        {"settings": LoopSettings(**base, total_steps=2), "train": files, "output": directory / "ddp"},
    ]


@pytest.mark.slow
def test_zero3_offload_resumes_exactly(two_worker_runs):
    """Two steps in two runs (the second resumes from the first's checkpoint) end with the same weights as
    two steps in one DDP run: weights, AdamW moments, schedule and data position all came back."""
    runs = two_worker_runs["zero3_offload_resume"]  # from the session's torchrun launch
    assert [m["step"] for m in read_metrics(runs / "zero3")] == [1, 2]
    resumed = load_file(str(runs / "zero3/checkpoints/step-00000002/trainable.safetensors"))
    straight = load_file(str(runs / "ddp/checkpoints/step-00000002/trainable.safetensors"))
    first = load_file(str(runs / "zero3/checkpoints/step-00000001/trainable.safetensors"))
    assert resumed.keys() == straight.keys()
    assert any(not torch.allclose(resumed[n], first[n]) for n in resumed)  # step 2 changed the adapter
    for n in straight:
        torch.testing.assert_close(resumed[n], straight[n], rtol=0, atol=1e-5, msg=n)
    assert read_metrics(runs / "zero3")[1]["loss"] == pytest.approx(read_metrics(runs / "ddp")[1]["loss"])
