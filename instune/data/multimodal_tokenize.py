"""Tokenization of image-text records with the model's processor and chat template.

The text side is the text pipeline's (tokenize.encode_conversations): the chat template renders the messages,
whose `<image>` placeholders are the tokenizer's image token, and labels cover each assistant turn's content and
end-of-turn token. Each image token is then expanded in place to the number of tokens the model's projector
writes for one image (LLaVA's convention: the processor does the same expansion), labelled IGNORE_INDEX, and the
images become the processor's pixel values. A record longer than `max_length` after the expansion is dropped
with its reason: cutting inside an image's tokens would leave the model with a partial image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from instune.data.tokenize import Encoded, TokenizeError, encode_conversations
from instune.data.truncate import IGNORE_INDEX

UNLIMITED = 1 << 30


@dataclass(frozen=True)
class ImageTokens:
    """How one image appears in the token stream: its placeholder id and the tokens it expands to."""

    token_id: int
    count: int


def image_tokens(processor) -> ImageTokens:
    """The processor's image token and its expansion, measured by running the processor on one blank image (so
    any LLaVA-style processor's own rule applies, whatever its patching and class-token settings)."""
    from PIL import Image

    tokenizer = processor.tokenizer
    token = getattr(processor, "image_token", None) or "<image>"
    token_id = tokenizer.convert_tokens_to_ids(token)
    side = _image_side(processor.image_processor)
    batch = processor(images=[Image.new("RGB", (side, side))], text=[token], return_tensors="np")
    count = int((batch["input_ids"][0] == token_id).sum())
    assert count > 0, f"the processor wrote no {token!r} tokens for an image"
    return ImageTokens(token_id, count)


def _image_side(image_processor) -> int:
    size = image_processor.size or {}
    return int(size.get("height") or size.get("shortest_edge") or 224)


def expand_image_tokens(ids: np.ndarray, labels: np.ndarray, image: ImageTokens) -> tuple[np.ndarray, np.ndarray]:
    """`ids` with every image token repeated `image.count` times, those positions unlabelled."""
    repeats = np.where(ids == image.token_id, image.count, 1)
    expanded_ids = np.repeat(ids, repeats)
    expanded_labels = np.repeat(labels, repeats)
    expanded_labels[expanded_ids == image.token_id] = IGNORE_INDEX
    return expanded_ids, expanded_labels


def pixel_values(processor, pngs: list[bytes]) -> np.ndarray:
    """(images, channels, height, width) float32: the processor's input for the images' PNG bytes."""
    from PIL import Image

    if not pngs:
        side = _image_side(processor.image_processor)
        return np.zeros((0, 3, side, side), dtype=np.float32)
    images = [Image.open(io.BytesIO(png)).convert("RGB") for png in pngs]
    return np.asarray(processor.image_processor(images=images, return_tensors="np")["pixel_values"],
                      dtype=np.float32)


def tokenize_multimodal(records: list[dict], processor, image: ImageTokens, max_length: int
                        ) -> list[dict | TokenizeError]:
    """One training example per record ({input_ids, labels, pixel_values, image_shape}), or its TokenizeError.

    The first example of each record is used (tokenize.tokenize_batch's rule), so the images stay with the turn
    that names them."""
    encoded = encode_conversations([r["messages"] for r in records], processor.tokenizer, UNLIMITED, "drop")
    results: list[dict | TokenizeError] = []
    for record, result in zip(records, encoded):
        if isinstance(result, TokenizeError):
            results.append(result)
            continue
        assert isinstance(result, Encoded)
        ids, labels = expand_image_tokens(*result.examples[0], image)
        placed = int((result.examples[0][0] == image.token_id).sum())
        if placed != len(record["images"]):
            # The template dropped or added a placeholder (e.g. a system turn it does not render).
            results.append(TokenizeError(f"{placed} image token(s) after the chat template, "
                                         f"{len(record['images'])} image(s)"))
            continue
        if len(ids) > max_length:
            results.append(TokenizeError(f"{len(ids)} tokens with images expanded, over model.max_length "
                                         f"{max_length}"))
            continue
        pixels = pixel_values(processor, record["images"])
        results.append({"input_ids": ids, "labels": labels, "pixel_values": pixels.reshape(-1),
                        "image_shape": list(pixels.shape)})
    return results
