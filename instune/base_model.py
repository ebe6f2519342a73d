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
    """The local HF model directory (config.json plus weights) holding the model `path` names (fetched whole
    from the Hub or a bucket first, see model_source.py), or a UserError naming the field. To check a model that
    only workers load, check_model_source fetches less."""
    from instune.model_source import local_model_dir

    p = Path(local_model_dir(path, field)).expanduser()
    names = tuple(sorted(f.name for f in p.iterdir())) if p.is_dir() else ()
    return _checked(path, field, p, names)


def check_model_source(path: str, field: str = "model.path") -> str:
    """`path` checked as check_model_dir does, as workers will get it: a Hub id or bucket URI as it is, checked
    by its config and file listing without downloading its weights to this node (each worker's node does,
    model_source.local_model_dir); a local directory resolved. UserError naming the field otherwise."""
    from instune.model_source import is_remote, model_files

    files = model_files(path, field)
    checked = _checked(path, field, files.directory, files.names)
    return path if is_remote(path) else str(checked)


def _checked(path: str, field: str, directory: Path, names: tuple[str, ...]) -> Path:
    if not directory.is_dir():
        raise UserError(f"{field}: {path} is not a directory (expected a Hugging Face model directory)")
    if "config.json" not in names:
        raise UserError(f"{field}: {path} has no config.json, so it is not a Hugging Face model directory")
    if not any(n.endswith((".safetensors", ".bin")) and "/" not in n for n in names):
        raise UserError(f"{field}: {path} has no weights (*.safetensors or *.bin)")
    return directory.resolve()


def resolve_base_model(model_config, output_dir: str | Path) -> tuple[str, str]:
    """(model source, tokenizer source): `resolve_model_sources`, with the tokenizer's chat template checked.

    With `model.chat_template`, the tokenizer is a copy under `output_dir/tokenizer` carrying that template
    (chat_template.tokenizer_with_template); without it, a tokenizer that has no template is refused here.
    """
    from instune.data.chat_template import has_chat_template, read_template, tokenizer_with_template
    from instune.model_source import model_files

    model, tokenizer = resolve_model_sources(model_config, output_dir)
    # The tokenizer's files only: a Hub or bucket model's weights are fetched by the workers' nodes.
    local = model_files(tokenizer, "model.tokenizer_path" if model_config.tokenizer_path else "model.path").directory
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
    checked its config and file listing (check_model_source): the workers' nodes fetch it (model_source.py).
    """
    from instune.model_source import is_remote, model_files

    if model_config.path:
        model_source = check_model_source(model_config.path)
        if not model_config.tokenizer_path:
            return model_source, model_source
        tokenizer = model_files(model_config.tokenizer_path, "model.tokenizer_path").directory
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
