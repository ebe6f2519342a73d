"""Open the model to evaluate: a full Hugging Face model directory, or a PEFT adapter on its base model.

Either may be a local directory, a Hub id or a bucket URI (model_source.py); the source travels to the eval
actors as it is, and each fetches it into its node's cache."""

from __future__ import annotations

import json
from pathlib import Path

from instune.errors import UserError
from instune.model_source import is_remote, local_model_dir, model_files

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | Path, field: str = "--model") -> bool:
    return (model_files(path, field).directory / ADAPTER_CONFIG).is_file()


def adapter_base_path(adapter_dir: str | Path, base_model_path: str | None, field: str = "--model") -> str:
    """The base model an adapter applies to: `base_model_path` if given, else the one its config names."""
    if base_model_path:
        return base_model_path
    config_file = model_files(adapter_dir, field).directory / ADAPTER_CONFIG
    try:
        named = json.loads(config_file.read_text()).get("base_model_name_or_path")
    except json.JSONDecodeError as e:
        raise UserError(f"{field}: {config_file} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not named or not (Path(named).is_dir() or is_remote(named)):
        raise UserError(f"{field}: {config_file} names base model {named!r}, which is not a local directory, "
                        "Hub id or bucket; set model.path to the base model")
    return named


def check_eval_model(path: str, base_model_path: str | None, field: str = "--model") -> str:
    """Check before Ray starts that `path` is a model or adapter we can open (fetching a Hub id or a bucket to
    this node); return it resolved, or as it is when remote."""
    from instune.base_model import check_model_source

    # Config files and the file listing only: the eval actors' nodes fetch a Hub or bucket model's weights.
    files = model_files(path, field)
    p = files.directory
    if not p.is_dir():
        raise UserError(f"{field}: {path} is not a directory (expected a model or a PEFT adapter directory)")
    if ADAPTER_CONFIG in files.names:  # the listing in hand, not a second lookup
        if not any(n.startswith("adapter_model.") for n in files.names):
            raise UserError(f"{field}: {path} has {ADAPTER_CONFIG} but no adapter_model.safetensors or .bin")
        check_model_source(adapter_base_path(p, base_model_path, field), field)
        return path if is_remote(path) else str(p.resolve())
    return check_model_source(path, field)


def load_model_and_tokenizer(model_path: str, base_model_path: str | None, dtype: str, device: str,
                             tokenizer_path: str | None = None):
    """(model in eval mode on `device`, tokenizer); an adapter directory loads base + adapter with PEFT.

    The tokenizer comes from `tokenizer_path` when given (the base model's, as base_model resolves it: with
    model.tokenizer_path or model.chat_template applied), else from the adapter directory when it holds one
    (training saves it there), else from the base. A tokenizer without a pad token pads with EOS: padding is
    masked out everywhere we use it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    model_path = local_model_dir(model_path)
    if is_adapter_dir(model_path):
        from peft import PeftModel

        base_path = local_model_dir(adapter_base_path(model_path, base_model_path))
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype)
        model = PeftModel.from_pretrained(base, model_path)
        has_tokenizer = (Path(model_path) / "tokenizer_config.json").is_file()
        tokenizer = AutoTokenizer.from_pretrained(model_path if has_tokenizer else base_path)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer_path is not None:
        tokenizer = AutoTokenizer.from_pretrained(local_model_dir(tokenizer_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    return model, tokenizer
