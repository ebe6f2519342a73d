"""Turn a training checkpoint into what users load: the adapter (or trained weights) and a merged full model.

The checkpoint holds the method's weights by name (checkpoint.py); here the same model is rebuilt from the
base, those weights are loaded, and it is saved the way transformers and PEFT read it:
  lora, ia3       adapter/ = PEFT adapter; merged/ = adapter folded into the base weights
  prefix, prompt  adapter/ = PEFT adapter only: virtual tokens are extra inputs, not weight changes, so
                  there is nothing to merge (load it with PeftModel.from_pretrained on the base)
  bitfit          adapter/ = the trained biases (safetensors) + method.json; merged/ = base with them
  full, lisa      adapter/ and merged/ = the full model
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from instune.atomic import atomic_dir
from instune.train.checkpoint import METHOD_FILE, load_weights, read_method
from instune.train.methods import PEFT_METHODS, PROMPT_METHODS, apply_method, saved_parameters

BITFIT_FILE = "bitfit.safetensors"


def rebuild_trained_model(checkpoint_dir: Path, base_model_path: str):
    """(model with the checkpoint's weights, its MethodSettings), in fp32 on the CPU."""
    from instune.model_source import is_remote, local_model_dir
    from instune.train.vision import model_class

    settings = read_method(checkpoint_dir)
    base = model_class(base_model_path).from_pretrained(local_model_dir(base_model_path))
    if is_remote(base_model_path):
        base.name_or_path = base_model_path  # the adapter names its Hub id or bucket, not this node's cache
    model = apply_method(base, settings)
    load_weights(model, Path(checkpoint_dir))
    return model.eval(), settings


def export_model(checkpoint_dir: Path, base_model_path: str, tokenizer_path: str, method: str,
                 output_dir: Path, outcome_markers: dict | None = None) -> tuple[Path, Path | None]:
    """Write output_dir/adapter and output_dir/merged (None for prefix/prompt tuning), each atomically;
    returns their paths. `outcome_markers`: the run's data.outcome_markers, recorded beside both."""
    from safetensors.torch import save_file
    from transformers import AutoProcessor, AutoTokenizer

    from instune.data.outcome import write_markers_file
    from instune.train.vision import is_vision_language

    model, settings = rebuild_trained_model(Path(checkpoint_dir), base_model_path)
    assert settings.method == method, f"checkpoint {checkpoint_dir} is {settings.method}, not {method}"
    from instune.model_source import local_model_dir

    # A vision-language model's processor (tokenizer, image processor, template) goes with it whole.
    loader = AutoProcessor if is_vision_language(base_model_path) else AutoTokenizer
    tokenizer = loader.from_pretrained(local_model_dir(tokenizer_path))
    adapter_dir, merged_dir = Path(output_dir) / "adapter", Path(output_dir) / "merged"
    with atomic_dir(adapter_dir) as tmp:
        if method == "bitfit":
            save_file({n: p.detach().contiguous() for n, p in saved_parameters(model, method)},
                      str(tmp / BITFIT_FILE))
            (tmp / METHOD_FILE).write_text(json.dumps(asdict(settings), indent=2))
        else:
            model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if outcome_markers:
            write_markers_file(tmp, outcome_markers)
    if method in PROMPT_METHODS:
        return adapter_dir, None
    merged = model.merge_and_unload() if method in PEFT_METHODS else model
    with atomic_dir(merged_dir) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if outcome_markers:
            write_markers_file(tmp, outcome_markers)
    return adapter_dir, merged_dir
