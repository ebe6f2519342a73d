"""Where the base model comes from: the user's model (a directory, a Hub id or a bucket path; see
model_source.py), or the embedded default built locally."""

from __future__ import annotations

import random
from pathlib import Path

from instune.errors import UserError


def tokenizer_training_texts(per_domain: int = 400, seed: int = 1234) -> list[str]:
    """Texts from every embedded domain, rendered as chat turns, for training the embedded tokenizer."""
    from instune.default.corpus import DOMAINS

    rng = random.Random(seed)
    texts = []
    for make in DOMAINS.values():
        for _ in range(per_domain):
            instruction, input_, output = make(rng)
            texts.append(f"{instruction}\n{input_}\n{output}".strip())
    return texts


def check_model_dir(path: str, field: str = "model.path") -> Path:
    """The local HF model directory (config.json plus weights) holding the model `path` names (fetched from
    the Hub or a bucket first, see model_source.py), or a UserError naming the field."""
    from instune.model_source import local_model_dir

    p = Path(local_model_dir(path, field)).expanduser()
    if not p.is_dir():
        raise UserError(f"{field}: {path} is not a directory (expected a Hugging Face model directory)")
    if not (p / "config.json").is_file():
        raise UserError(f"{field}: {path} has no config.json, so it is not a Hugging Face model directory")
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise UserError(f"{field}: {path} has no weights (*.safetensors or *.bin)")
    return p.resolve()


def resolve_base_model(model_config, output_dir: str | Path) -> tuple[str, str]:
    """(model source, tokenizer source): `resolve_model_sources`, with the tokenizer's chat template checked.

    With `model.chat_template`, the tokenizer is a copy under `output_dir/tokenizer` carrying that template
    (chat_template.tokenizer_with_template); without it, a tokenizer that has no template is refused here.
    """
    from instune.data.chat_template import has_chat_template, read_template, tokenizer_with_template
    from instune.model_source import local_model_dir

    model, tokenizer = resolve_model_sources(model_config, output_dir)
    local = local_model_dir(tokenizer, "model.tokenizer_path" if model_config.tokenizer_path else "model.path")
    if model_config.chat_template:
        return model, tokenizer_with_template(local, read_template(model_config.chat_template),
                                              Path(output_dir) / "tokenizer")
    if not has_chat_template(local):
        raise UserError(f"model.chat_template: the tokenizer at {tokenizer} has no chat template; set "
                        "model.chat_template to a bundled template (chatml, llama3, ...) or a .jinja file")
    return model, tokenizer


def resolve_model_sources(model_config, output_dir: str | Path) -> tuple[str, str]:
    """(model source, tokenizer source), building the embedded default under `output_dir/base_model` if unset.

    A local directory comes back resolved; a Hub id or a bucket URI comes back as it is, after this node has
    fetched and checked it: workers on other nodes fetch it from the same source (model_source.py).
    """
    from instune.model_source import is_remote, local_model_dir

    if model_config.path:
        model = check_model_dir(model_config.path)
        model_source = model_config.path if is_remote(model_config.path) else str(model)
        if not model_config.tokenizer_path:
            return model_source, model_source
        tokenizer = Path(local_model_dir(model_config.tokenizer_path, "model.tokenizer_path")).expanduser()
        if not tokenizer.is_dir():
            raise UserError(f"model.tokenizer_path: {tokenizer} is not a directory")
        tokenizer_source = model_config.tokenizer_path if is_remote(model_config.tokenizer_path) \
            else str(tokenizer.resolve())
        return model_source, tokenizer_source
    from instune.default.model import ensure_embedded_model

    e = model_config.embedded
    directory = ensure_embedded_model(
        Path(output_dir) / "base_model", tokenizer_training_texts(), vocab_size=e.vocab_size,
        hidden_size=e.hidden_size, num_layers=e.num_layers, num_heads=e.num_heads,
        intermediate_size=e.intermediate_size, max_position_embeddings=e.max_position_embeddings, seed=0)
    return str(directory.resolve()), str(directory.resolve())
