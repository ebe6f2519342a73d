"""The embedded default vision-language model: a small LLaVA built from transformers configs, no downloads.

LLaVA's recipe (Liu et al. 2023, "Visual Instruction Tuning"): a vision encoder's patch features go through a
projector into the language model's embedding space and replace the `<image>` tokens of the prompt. Here the
encoder is a 2-layer CLIP vision transformer on 32x32 images (4x4 patches of 8 pixels: 16 image tokens per
image), the language model is the embedded Llama (instune/default/model.py) with `<image>` added to its
tokenizer, and the image processor is transformers' PIL one (`CLIPImageProcessorPil`), so neither torchvision
nor a network is needed. `ensure_embedded_vlm` writes a normal HF directory (config, weights, tokenizer, chat
template, processor), loadable with `AutoProcessor` / `AutoModelForImageTextToText` like a user's LLaVA.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from instune.atomic import atomic_dir
from instune.config import VlmEmbeddedConfig
from instune.default.model import build_model
from instune.default.tokenizer import train_tokenizer

MARKER = "instune_embedded_vlm.json"
IMAGE_TOKEN = "<image>"


def patches_per_image(settings: VlmEmbeddedConfig) -> int:
    """Tokens one image becomes in the prompt: one per patch (CLIP's class token is dropped: "default")."""
    return (settings.image_size // settings.patch_size) ** 2


def build_vlm(tokenizer, settings: VlmEmbeddedConfig, seed: int = 0):
    """(LlavaForConditionalGeneration, LlavaProcessor) randomly initialised; `tokenizer` must hold IMAGE_TOKEN."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers import LlavaProcessor

    s = settings
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_token_id != tokenizer.unk_token_id and image_token_id is not None, "tokenizer lacks <image>"
    language_model = build_model(tokenizer, s.hidden_size, s.num_layers, s.num_heads, s.intermediate_size,
                                 s.max_position_embeddings, seed)
    vision_config = CLIPVisionConfig(hidden_size=s.vision_hidden_size, intermediate_size=2 * s.vision_hidden_size,
                                     num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads,
                                     image_size=s.image_size, patch_size=s.patch_size,
                                     projection_dim=s.vision_hidden_size)
    config = LlavaConfig(vision_config=vision_config, text_config=language_model.config,
                         image_token_index=image_token_id, vision_feature_select_strategy="default",
                         vision_feature_layer=-1, image_seq_length=patches_per_image(s),
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    # The language model starts from the same initial weights as the text-only embedded model of this size.
    model.model.language_model.load_state_dict(language_model.model.state_dict())
    model.lm_head.load_state_dict(language_model.lm_head.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    # Square resize, no crop: the generated tasks ask about positions, which a centre crop would cut off.
    image_processor = CLIPImageProcessorPil(size={"height": s.image_size, "width": s.image_size},
                                            do_center_crop=False)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=s.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token=IMAGE_TOKEN, chat_template=tokenizer.chat_template)
    return model, processor


def vlm_tokenizer(texts: Iterable[str], vocab_size: int):
    """The embedded byte-level BPE tokenizer (ChatML) trained on `texts`, with IMAGE_TOKEN as one special token."""
    tokenizer = train_tokenizer(texts, vocab_size)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


def ensure_embedded_vlm(directory: str | Path, texts: Iterable[str], settings: VlmEmbeddedConfig = VlmEmbeddedConfig(),
                        seed: int = 0) -> Path:
    """Build (once) the embedded VLM, tokenizer and processor into `directory` and return it; a directory built
    with the same settings is reused, so every stage and trial sees the same base weights."""
    directory = Path(directory)
    marker = directory / MARKER
    built_with = {**settings.model_dump(), "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == built_with:
        return directory
    tokenizer = vlm_tokenizer(texts, settings.vocab_size)
    model, processor = build_vlm(tokenizer, settings, seed)
    with atomic_dir(directory) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        processor.save_pretrained(str(tmp))
        (tmp / MARKER).write_text(json.dumps(built_with))
    return directory


def load_vlm(directory: str | Path, dtype: torch.dtype = torch.float32):
    """(model, processor) from a LLaVA-style HF directory (the embedded one or a user's)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(directory))
    model = AutoModelForImageTextToText.from_pretrained(str(directory), dtype=dtype)
    return model, processor
