"""Which parameters train: full fine-tuning or a PEFT method wrapped around the base model."""

from __future__ import annotations

from dataclasses import dataclass, field


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


def apply_method(model, settings: MethodSettings):
    """Return the model with only the method's parameters trainable (a PeftModel for PEFT methods)."""
    if settings.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if settings.method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=settings.target_modules,
            use_rslora=settings.use_rslora,
            use_dora=settings.use_dora,
            modules_to_save=settings.modules_to_save or None,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, config)
    raise AssertionError(f"unknown method {settings.method!r} passed config validation")


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
