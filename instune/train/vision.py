"""What training does differently for a vision-language model (LLaVA-style: vision tower, projector, LM).

A model directory whose config has a `vision_config` is loaded with AutoModelForImageTextToText. Its vision
tower is frozen unless asked otherwise: the encoder was pre-trained on far more images than an instruction
set holds, and LLaVA's own fine-tuning stage trains the projector and the language model only (Liu et al.
2023). LoRA targets follow the same split: the language model's projections and the projector's two linear
layers, and the vision tower's too only when it is to train.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

# PEFT matches a string target_modules with re.fullmatch against each module's full name.
LANGUAGE_AND_PROJECTOR = r"language_model\..*_proj|multi_modal_projector\.linear_\d+"
VISION_TOWER = r"vision_tower\..*(_proj|fc\d)"


def is_vision_language(model_path: str) -> bool:
    """Whether the (local or fetched) model directory holds a vision-language model."""
    from instune.model_source import local_model_dir

    config = Path(local_model_dir(model_path)) / "config.json"
    return config.is_file() and "vision_config" in json.loads(config.read_text())


def model_class(model_path: str):
    """The transformers Auto class that loads `model_path` for training and export."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_vision_language(model_path) else AutoModelForCausalLM


def lora_targets(train_vision_tower: bool) -> str:
    """LoRA's target_modules for a LLaVA-style model: LM and projector, plus the vision tower if it trains."""
    parts = [LANGUAGE_AND_PROJECTOR] + ([VISION_TOWER] if train_vision_tower else [])
    return rf".*\.({'|'.join(parts)})"


def freeze_vision_tower(model) -> int:
    """Stop the vision tower's weights from training; returns how many tensors were frozen."""
    frozen = 0
    for name, parameter in model.named_parameters():
        if ".vision_tower." in f".{name}" and parameter.requires_grad:
            parameter.requires_grad_(False)
            frozen += 1
    return frozen


def method_for(method, model_path: str, train_vision_tower: bool):
    """`method` (MethodSettings) with LoRA's "all-linear" narrowed to lora_targets for a vision-language model;
    unchanged otherwise. The checkpoint records the narrowed targets, so export rebuilds the same adapter."""
    if method.method != "lora" or method.target_modules != "all-linear" or not is_vision_language(model_path):
        return method
    return replace(method, target_modules=lora_targets(train_vision_tower))
