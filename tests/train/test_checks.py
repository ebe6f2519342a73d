"""Impossible settings are refused with one line before any worker starts."""

from __future__ import annotations

import json

import pytest
from .train_helpers import write_tiny_model

from instune.config import StrategyConfig
from instune.errors import UserError
from instune.train.checks import check_resume_dir, check_training_plan
from instune.train.loop import LoopSettings
from instune.train.methods import MethodSettings


def settings_for(model, method="lora", **kw) -> LoopSettings:
    return LoopSettings(model_path=str(model), total_steps=1, method=MethodSettings(method=method), **kw)


def refused(settings, packed=True) -> str:
    with pytest.raises(UserError) as e:
        check_training_plan(settings, packed)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_possible_plans_pass(tiny_model):
    for method in ("lora", "ia3", "bitfit", "full", "lisa"):
        check_training_plan(settings_for(tiny_model, method), packed=True)
    for method in ("prefix", "prompt", "lora", "full"):
        check_training_plan(settings_for(tiny_model, method, strategy="deepspeed", zero_stage=3), packed=False)


def test_lisa_under_deepspeed_is_refused(tiny_model):
    assert "peft.method" in refused(settings_for(tiny_model, "lisa", strategy="deepspeed"))


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_virtual_token_methods_need_padded_rows(tiny_model, method):
    assert "data.pack" in refused(settings_for(tiny_model, method), packed=True)


def test_bitfit_needs_biases(tmp_path):
    model = write_tiny_model(tmp_path / "no_bias", biases=False)
    assert "has none" in refused(settings_for(model, "bitfit"))


def test_lisa_layers_must_exist(tiny_model):
    settings = settings_for(tiny_model, "lisa")
    settings.method.lisa_layers = 3
    assert "peft.lisa_layers: 3 is more than the 2" in refused(settings)


def test_float16_needs_deepspeed(tiny_model):
    assert "model.dtype" in refused(settings_for(tiny_model, dtype="float16"))
    check_training_plan(settings_for(tiny_model, dtype="float16", strategy="deepspeed"), packed=True)


def test_flex_attention_needs_a_gpu(tiny_model):
    assert refused(settings_for(tiny_model, attn_implementation="flex_attention")).startswith(
        "model.attn_implementation: flex_attention cannot train on the CPU")
    check_training_plan(settings_for(tiny_model, attn_implementation="flex_attention", use_gpu=True), packed=True)


def test_varlen_attention_and_liger_kernels_need_a_gpu(tiny_model):
    assert refused(settings_for(tiny_model, attn_implementation="varlen_attention")).startswith(
        "model.attn_implementation: varlen_attention cannot run on the CPU")
    check_training_plan(settings_for(tiny_model, attn_implementation="varlen_attention", use_gpu=True), packed=True)
    assert refused(settings_for(tiny_model, kernels="liger")).startswith("model.kernels: liger needs a CUDA GPU")
    # liger-kernel is an optional extra (instune[gpu]); this environment has no CUDA and does not install it.
    assert refused(settings_for(tiny_model, kernels="liger", use_gpu=True)) == (
        "model.kernels: liger needs the liger-kernel package (pip install 'instune[gpu]'); use auto or none")
    check_training_plan(settings_for(tiny_model, kernels="auto"), packed=True)


def test_deepspeed_checkpoint_engines_that_load_outside_the_weights_only_reader_are_refused(tiny_model):
    writer = refused(settings_for(tiny_model, strategy="deepspeed",
                                  deepspeed={"checkpoint": {"writer": {"type": "fast"}, "load_universal": True}}))
    assert writer.startswith("strategy.deepspeed.checkpoint.writer, strategy.deepspeed.checkpoint.load_universal:")
    assert "strategy.deepspeed.datastates_ckpt" in refused(settings_for(tiny_model, strategy="deepspeed",
                                                                        deepspeed={"datastates_ckpt": {}}))
    check_training_plan(settings_for(tiny_model, strategy="deepspeed",
                                     deepspeed={"checkpoint": {"tag_validation": "Warn"}}), packed=True)


def test_offloading_parameters_needs_zero_3():
    with pytest.raises(ValueError, match="zero_stage 3"):
        StrategyConfig(name="deepspeed", zero_stage=2, offload_params=True)
    assert StrategyConfig(name="deepspeed", zero_stage=3, offload_params=True).offload_params


def write_checkpoint(run_dir, method: MethodSettings, world_size: int, with_state: bool = True):
    from dataclasses import asdict

    checkpoint = run_dir / "checkpoint_2026-01-01_00-00-00.000000"
    checkpoint.mkdir(parents=True)
    (run_dir / "checkpoint_manager_snapshot.json").write_text("{}")
    (checkpoint / "method.json").write_text(json.dumps(asdict(method)))
    if with_state:
        (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 2, "micro_batches_done": 2,
                                                                   "world_size": world_size}))


def test_a_run_directory_of_another_method_or_world_size_is_refused(tmp_path):
    lora = MethodSettings(method="lora")
    check_resume_dir(tmp_path / "absent", lora, "ddp", 2)
    write_checkpoint(tmp_path / "run", lora, world_size=2)
    check_resume_dir(tmp_path / "run", lora, "ddp", 4)  # DDP checkpoints resume on any number of workers
    with pytest.raises(UserError, match="different peft setting"):
        check_resume_dir(tmp_path / "run", MethodSettings(method="full"), "ddp", 2)
    with pytest.raises(UserError, match="resume with 2 workers"):
        check_resume_dir(tmp_path / "run", lora, "deepspeed", 4)
    write_checkpoint(tmp_path / "old", lora, world_size=2, with_state=False)
    with pytest.raises(UserError, match="delete"):
        check_resume_dir(tmp_path / "old", lora, "ddp", 2)
