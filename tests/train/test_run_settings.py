"""One path from config to a training run: every setting of the sections a run is built from reaches the
loop's or Ray Train's settings, or is listed with where it goes instead; values arrive unchanged."""

from __future__ import annotations

import dataclasses

import pytest

from instune.config import validate_config
from instune.errors import UserError
from instune.train.loop import LoopSettings
from instune.train.methods import MethodSettings
from instune.train.trainer import (NOT_IN_RUN_SETTINGS, RENAMED, RUN_SECTIONS, WorkerSettings, training_run)

# Not the defaults, so a value that does not arrive is seen.
CHANGED = {
    "model": {"dtype": "bfloat16", "attn_implementation": "eager", "gradient_checkpointing": True,
              "gradient_checkpointing_fraction": 0.5, "kernels": "none"},
    "train": {"lr": 0.123, "micro_batch_size": 3, "grad_accum": 2, "warmup_ratio": 0.5, "weight_decay": 0.25,
              "max_grad_norm": 0.5, "log_every": 7, "seed": 11, "head_dropout": 0.5, "optimizer": "sgd",
              "eval_every": 3, "checkpoint_every": 5, "keep_checkpoints": 4, "max_failures": 3, "max_steps": 9,
              "compile": True},
    "strategy": {"name": "deepspeed", "zero_stage": 3, "offload_optimizer": True, "offload_params": True,
                 "deepspeed": {"zero_optimization": {"stage3_max_live_parameters": 1000}}},
    "scaling": {"num_workers": 3, "use_gpu": True, "cpus_per_worker": 2, "gpus_per_worker": 0.5,
                "placement_strategy": "SPREAD"},
    "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.2, "target_modules": ["q_proj"],
             "use_rslora": True, "use_dora": True, "modules_to_save": ["lm_head"], "num_virtual_tokens": 5,
             "lisa_layers": 3, "lisa_period": 4},
}


def config(**sections):
    return validate_config({"name": "t", "output_dir": "/tmp/t", "data": {"sources": [{"name": "a", "path": "x"}]},
                            **sections})


def field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_every_field_of_the_run_sections_reaches_the_settings_or_is_listed_as_used_elsewhere():
    c = config()
    taken = field_names(LoopSettings) | field_names(WorkerSettings)
    lost = [f"{name}.{key}" for name in RUN_SECTIONS for key in type(getattr(c, name)).model_fields
            if RENAMED.get(f"{name}.{key}", key) not in taken and f"{name}.{key}" not in NOT_IN_RUN_SETTINGS]
    lost += [f"peft.{key}" for key in type(c.peft).model_fields
             if key not in field_names(MethodSettings) and f"peft.{key}" not in NOT_IN_RUN_SETTINGS]
    assert lost == [], f"config fields that reach no training setting; add them to LoopSettings, " \
                       f"WorkerSettings or MethodSettings under the same name, or to NOT_IN_RUN_SETTINGS: {lost}"
    # The list names real fields, none of which the settings take after all.
    for path in NOT_IN_RUN_SETTINGS:
        section, key = path.split(".")
        assert key in type(getattr(c, section)).model_fields, path
        assert key not in taken | field_names(MethodSettings), path


def test_the_config_values_arrive_unchanged_in_the_loop_and_ray_train_settings():
    c = config(**CHANGED)
    run = training_run(c, "/models/base", rows=100, eval_datasets=["held_out"])
    loop, workers = dataclasses.asdict(run.loop), dataclasses.asdict(run.workers)
    for section, values in CHANGED.items():
        for key, value in values.items():
            name = RENAMED.get(f"{section}.{key}", key)
            if section == "peft":
                assert loop["method"][name] == value, f"peft.{key}"
            elif f"{section}.{key}" not in NOT_IN_RUN_SETTINGS:
                got = [s[name] for s in (loop, workers) if name in s]
                assert got and all(v == value for v in got), f"{section}.{key}: {got} != {value}"
    assert (run.loop.model_path, run.loop.total_steps, run.loop.eval_datasets) == ("/models/base", 9, ["held_out"])
    # The settings hold copies: changing them leaves the config as it was.
    run.loop.deepspeed["zero_optimization"]["stage3_max_live_parameters"] = 1
    assert c.strategy.deepspeed["zero_optimization"]["stage3_max_live_parameters"] == 1000


def test_total_steps_and_the_eval_interval_are_computed_from_the_config():
    # 100 rows over 2 workers x 2 rows x 1 accumulation: 25 steps an epoch.
    run = training_run(config(train={"epochs": 2, "micro_batch_size": 2, "log_every": 4}), "m", rows=100)
    assert (run.loop.total_steps, run.loop.eval_every) == (50, 4)
    with pytest.raises(UserError, match="train.micro_batch_size: 3 training rows"):
        training_run(config(train={"micro_batch_size": 2}), "m", rows=3)


def test_a_run_trained_with_outcome_markers_carries_them_to_export():
    markers = {"field": "ok", "success": "Succeed.", "failure": "Fail.", "position": "prefix"}
    run = training_run(config(data={"sources": [{"name": "a", "path": "x"}], "outcome_markers": markers}), "m",
                       rows=100)
    assert run.outcome_markers == markers
    assert training_run(config(), "m", rows=100).outcome_markers is None
