"""Every recipe in configs/recipes trains: loaded as the CLI loads it, its model swapped for a scaled-down model
of the same architecture, 2 steps on the CPU (in the session's torchrun launch, conftest.py two_worker_runs).

The models are the real config.json of each family (recipe_models/*.json: Llama 3.1's llama3 rope scaling,
Qwen 2.5's biased attention, Qwen 3's explicit head_dim, Mistral, Gemma 2's soft-capping and query scaling,
Phi-3.5's fused projections and longrope) with the sizes scaled down: hidden 64, 2 layers, 4 query heads and
key-value heads in the real ratio where it divides, vocabulary 512 with the special ids inside it. Only what a
CPU cannot do is overridden: the GPU, the number of workers (2, one torchrun launch for all recipes) and the
logging interval; the recipe's method, strategy (DDP or ZeRO-3), dtype, attention, gradient checkpointing and
batch shape stay.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from .train_helpers import REPO, read_metrics, two_worker_plan, write_packed_rows

from instune.config import load_config

RECIPES = sorted((REPO / "configs" / "recipes").glob("*.yaml"))
MODELS = Path(__file__).parent / "recipe_models"
FAMILIES = ["llama-3.1-8b-instruct", "qwen2.5-7b-instruct", "qwen3-8b", "mistral-7b-instruct-v0.3",
            "gemma-2-9b-it", "phi-3.5-mini-instruct"]
KINDS = ("lora", "full-zero3")


def family_of(recipe: Path) -> str:
    return recipe.stem.removesuffix("-lora").removesuffix("-full-zero3")


def write_scaled_model(family: str, directory: Path) -> tuple[Path, int]:
    """The family's scaled-down model, randomly initialised, saved as a Hugging Face directory; with its
    parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    directory.mkdir(parents=True)
    (directory / "config.json").write_text((MODELS / f"{family}.json").read_text())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory), dtype=torch.float32)
    expected_class = json.loads((MODELS / f"{family}.json").read_text())["architectures"][0]
    assert type(model).__name__ == expected_class, f"{family}: built {type(model).__name__}"
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory, sum(p.numel() for p in model.parameters())


def test_there_is_a_lora_and_a_zero3_recipe_for_every_family():
    assert sorted(r.stem for r in RECIPES) == sorted(f"{f}-{k}" for f in FAMILIES for k in KINDS)
    for recipe in RECIPES:
        config = load_config(recipe)
        text = recipe.read_text()
        assert "GPUs and memory" in text and " GB" in text, f"{recipe.name}: no comment on GPUs and memory"
        assert config.model.dtype == "bfloat16" and config.scaling.use_gpu
        if recipe.stem.endswith("lora"):
            assert (config.peft.method, config.strategy.name) == ("lora", "ddp")
        else:
            assert (config.peft.method, config.strategy.name, config.strategy.zero_stage) == ("full", "deepspeed", 3)
            assert config.scaling.num_workers > 8, f"{recipe.name}: full fine-tuning is for several nodes"


def recipe_config(recipe: Path, model_dir: Path, directory: Path):
    """The recipe as the CLI loads it, on the scaled-down model and 2 CPU workers, for 2 steps."""
    return load_config(recipe, [f"model.path={model_dir}", f"output_dir={directory / recipe.stem}",
                                "scaling.use_gpu=false", "scaling.num_workers=2", "train.max_steps=2",
                                "train.log_every=1"])


@two_worker_plan("recipes")
def every_recipe_on_two_workers(model, directory):
    """Every recipe's training run on its family's scaled-down model (`model`, the session's tiny one, is not
    used); the models' parameter counts go to parameters.json."""
    from instune.train.trainer import training_run

    rows = write_packed_rows(directory / "rows", 32, seed=3)
    files = [str(p) for p in sorted(rows.glob("*.parquet"))]
    models = {family: write_scaled_model(family, directory / "models" / family) for family in FAMILIES}
    (directory / "parameters.json").write_text(json.dumps({family: n for family, (_, n) in models.items()}))
    return [{"settings": training_run(recipe_config(recipe, models[family_of(recipe)][0], directory),
                                      str(models[family_of(recipe)][0]), rows=0).loop,
             "train": files, "output": directory / "runs" / recipe.stem} for recipe in RECIPES]


@pytest.mark.slow
def test_every_recipe_trains_two_steps_on_a_scaled_down_model_of_its_architecture(two_worker_runs):
    from instune.train.trainer import training_run

    directory = two_worker_runs["recipes"]
    parameters_of = json.loads((directory / "parameters.json").read_text())
    for recipe in RECIPES:
        model_dir = directory / "models" / family_of(recipe)
        run = training_run(recipe_config(recipe, model_dir, directory), str(model_dir), rows=0)
        assert run.loop.total_steps == 2 and run.loop.model_path == str(model_dir)  # what the plan launched
        parameters = parameters_of[family_of(recipe)]
        output = directory / "runs" / recipe.stem
        metrics = read_metrics(output)
        assert [m["step"] for m in metrics] == [1, 2], recipe.name
        assert all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics), recipe.name
        last = metrics[-1]
        if recipe.stem.endswith("lora"):
            # The base is frozen whole; only LoRA's added weights train.
            assert last["total_params"] - last["trainable_params"] == parameters, recipe.name
            assert last["trainable_params"] > 0, recipe.name
        else:
            assert last["trainable_params"] == last["total_params"] == parameters, recipe.name
        assert (output / "checkpoints" / "step-00000002").is_dir(), recipe.name
