"""The embedded default model: a small Llama built from a transformers config, plus its local tokenizer.

`ensure_embedded_model` writes a normal HF model directory (config, safetensors weights, tokenizer, chat
template), so everything downstream loads it by path exactly as it would load a user's model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from instune.atomic import atomic_dir
from instune.default.tokenizer import save_tokenizer, train_tokenizer

MARKER = "instune_embedded.json"


def build_model(tokenizer, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int,
                max_position_embeddings: int, seed: int) -> LlamaForCausalLM:
    """A randomly initialised Llama sized by the arguments, with ids taken from `tokenizer`."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def ensure_embedded_model(directory: str | Path, texts: Iterable[str], *, vocab_size: int, hidden_size: int,
                          num_layers: int, num_heads: int, intermediate_size: int,
                          max_position_embeddings: int, seed: int) -> Path:
    """Build (once) the embedded model + tokenizer into `directory` and return it.

    An existing directory built with the same settings is reused, so every trial of a sweep and every
    stage of a run see the same base weights.
    """
    directory = Path(directory)
    settings = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                    intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings, seed=seed)
    marker = directory / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return directory
    tokenizer = train_tokenizer(texts, vocab_size)
    model = build_model(tokenizer, hidden_size, num_layers, num_heads, intermediate_size,
                        max_position_embeddings, seed)
    with atomic_dir(directory) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
        (tmp / MARKER).write_text(json.dumps(settings))
    return directory
