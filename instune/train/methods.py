"""Which parameters train: full fine-tuning, a PEFT method wrapped around the base model, BitFit or LISA.

A checkpoint holds `saved_parameters(model, method)`: the trainable tensors for the adapter methods and
BitFit, every weight for full and LISA (whose trainable layers change over the run). `export.py` rebuilds
the same model from the base and these tensors, so the checkpoint format is the same for every method and
every strategy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Methods whose trainable part PEFT saves as an adapter directory (adapter_config.json + safetensors).
PEFT_METHODS = ("lora", "prefix", "prompt", "ia3")
# Virtual-token methods: nothing to fold into the weights, the adapter is the result.
PROMPT_METHODS = ("prefix", "prompt")
# Methods whose checkpoint holds every weight.
WHOLE_MODEL_METHODS = ("full", "lisa")


@dataclass
class MethodSettings:
    method: str = "lora"
    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    num_virtual_tokens: int = 16
    lisa_layers: int = 2
    lisa_period: int = 20


def peft_config(settings: MethodSettings):
    """The PEFT config object for a PEFT method."""
    import peft

    save = settings.modules_to_save or None
    if settings.method == "lora":
        return peft.LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                               target_modules=settings.target_modules, use_rslora=settings.use_rslora,
                               use_dora=settings.use_dora, modules_to_save=save, task_type="CAUSAL_LM")
    if settings.method == "ia3":
        # "all-linear" means PEFT's per-architecture defaults (Llama: k, v and down projections, the last
        # scaled on its input as in the IA3 paper); a list scales those modules' outputs.
        targets = None if settings.target_modules == "all-linear" else settings.target_modules
        return peft.IA3Config(target_modules=targets, feedforward_modules=[] if targets else None,
                              modules_to_save=save, task_type="CAUSAL_LM")
    if settings.method == "prefix":
        return peft.PrefixTuningConfig(num_virtual_tokens=settings.num_virtual_tokens, modules_to_save=save,
                                       task_type="CAUSAL_LM")
    if settings.method == "prompt":
        return peft.PromptTuningConfig(num_virtual_tokens=settings.num_virtual_tokens, modules_to_save=save,
                                       task_type="CAUSAL_LM")
    raise AssertionError(f"{settings.method!r} is not a PEFT method")


def bias_names(model) -> list[str]:
    return [name for name, _ in model.named_parameters() if name.endswith(".bias")]


def apply_method(model, settings: MethodSettings):
    """Return the model with only the method's parameters trainable (a PeftModel for PEFT methods).

    LISA starts with every parameter trainable; `lisa.set_active_layers` freezes all but a few layers.
    """
    if settings.method in PEFT_METHODS:
        from peft import get_peft_model

        return get_peft_model(model, peft_config(settings))
    if settings.method in WHOLE_MODEL_METHODS:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if settings.method == "bitfit":
        # BitFit (Ben Zaken et al. 2021): only the bias terms train, plus any modules named to save.
        biases = set(bias_names(model))
        assert biases, "bitfit needs bias parameters; the driver checks this before training"
        for name, p in model.named_parameters():
            module_path = name.rsplit(".", 1)[0]
            saved = any(module_path == m or module_path.endswith("." + m) for m in settings.modules_to_save)
            p.requires_grad_(name in biases or saved)
        return model
    raise AssertionError(f"unknown method {settings.method!r} passed config validation")


def saved_parameters(model, method: str) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) pairs a checkpoint holds for `method`: all weights, or the trainable ones."""
    if method in WHOLE_MODEL_METHODS:
        return list(model.named_parameters())
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def add_head_dropout(model, rate: float) -> None:
    """Drop out the hidden state entering the LM head while training (Zhang & Bottou 2024, "Fine-tuning
    with very large dropout": rates near 0.9 on the penultimate representation help out-of-distribution).

    A forward pre-hook, so it works the same for every method and strategy and is not part of what is
    saved: the exported model has no dropout.
    """
    import torch.nn.functional as F

    def drop(module, args):
        return (F.dropout(args[0], rate, module.training), *args[1:])

    model.get_output_embeddings().register_forward_pre_hook(drop)
