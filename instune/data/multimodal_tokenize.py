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
    side = image_side(processor.image_processor)
    batch = processor(images=[Image.new("RGB", (side, side))], text=[token], return_tensors="np")
    count = int((batch["input_ids"][0] == token_id).sum())
    assert count > 0, f"the processor wrote no {token!r} tokens for an image"
    return ImageTokens(token_id, count)


def image_side(image_processor) -> int:
    """The side of the square images the processor feeds the model (its resize target)."""
    size = image_processor.size or {}
    return int(size.get("height") or size.get("shortest_edge") or 224)


def expand_image_tokens(ids: np.ndarray, labels: np.ndarray, image: ImageTokens) -> tuple[np.ndarray, np.ndarray]:
    """`ids` with every image token repeated `image.count` times, those positions unlabelled."""
    repeats = np.where(ids == image.token_id, image.count, 1)
    expanded_ids = np.repeat(ids, repeats)
    expanded_labels = np.repeat(labels, repeats)
    expanded_labels[expanded_ids == image.token_id] = IGNORE_INDEX
    return expanded_ids, expanded_labels


class ImagePixels:
    """The processor's pixel values for a batch of PNG images, (images, channels, height, width) float32.

    Calling the image processor costs about 1.4 ms an image on one core (PIL round trips and argument checks),
    more than decoding the image, and prepare calls it for every image it keeps. For images already at the
    processor's input size, a LLaVA/CLIP-style processor's work is a per-channel affine map of the pixels
    (a resize to the same size, rescale, normalise): numpy does that in about 0.1 ms. The map is measured once
    on a noise image and used only if it reproduces the processor's output there; other processors, and images
    of another size, go through the processor (one call per batch).
    """

    def __init__(self, image_processor):
        self.image_processor = image_processor
        self.side = image_side(image_processor)
        self.scale, self.shift = self._affine_map()

    def _affine_map(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        from PIL import Image

        probe = np.random.default_rng(0).integers(0, 256, (self.side, self.side, 3), dtype=np.uint8)
        expected = self._from_processor([Image.fromarray(probe)])
        if expected.shape != (1, 3, self.side, self.side):
            return None, None
        x = probe.reshape(-1, 3).astype(np.float64)
        y = expected[0].reshape(3, -1).T.astype(np.float64)
        scale = ((x - x.mean(0)) * (y - y.mean(0))).sum(0) / ((x - x.mean(0)) ** 2).sum(0)
        shift = y.mean(0) - scale * x.mean(0)
        if np.abs(x * scale + shift - y).max() > 1e-4:
            return None, None
        return scale.astype(np.float32), shift.astype(np.float32)

    def _from_processor(self, images: list) -> np.ndarray:
        return np.asarray(self.image_processor(images=images, return_tensors="np")["pixel_values"], dtype=np.float32)

    def __call__(self, images: list[bytes | np.ndarray]) -> np.ndarray:
        """Pixel values of `images`: PNG bytes, or RGB arrays (height, width, 3) already decoded."""
        from PIL import Image

        if not images:
            return np.zeros((0, 3, self.side, self.side), dtype=np.float32)
        arrays = [image if isinstance(image, np.ndarray) else np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
                  for image in images]
        if self.scale is None or any(array.shape != (self.side, self.side, 3) for array in arrays):
            return self._from_processor([Image.fromarray(array) for array in arrays])
        pixels = np.stack(arrays).astype(np.float32) * self.scale + self.shift
        return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))


def tokenize_multimodal(records: list[dict], processor, image: ImageTokens, max_length: int,
                        pixels: ImagePixels | None = None, render=None, backend=None) -> list[dict | TokenizeError]:
    """One training example per record ({input_ids, labels, pixel_values, image_shape}), or its TokenizeError.

    The first example of each record is used (tokenize.tokenize_batch's rule), so the images stay with the turn
    that names them. A record's `images` are PNG bytes or decoded RGB arrays (ImagePixels); `pixels` (made from
    the processor if not given) computes the batch's images at once; `render` and `backend` are
    tokenize.encode_conversations' (a caller tokenizing many batches builds them once)."""
    encoded = encode_conversations([r["messages"] for r in records], processor.tokenizer, UNLIMITED, "drop",
                                   render=render, backend=backend)
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
        results.append({"input_ids": ids, "labels": labels, "images": record["images"]})
    pixels = pixels or ImagePixels(processor.image_processor)
    kept = [r for r in results if isinstance(r, dict)]
    values = pixels([png for r in kept for png in r["images"]])
    start = 0
    for row in kept:
        count = len(row.pop("images"))
        # A text-only record keeps the (0, channels, height, width) shape, so its rows concatenate with others.
        own = values[start:start + count] if count else np.zeros((0, *values.shape[1:]), dtype=np.float32)
        start += count
        row["pixel_values"], row["image_shape"] = own.reshape(-1), list(own.shape)
    return results
