"""Tokenization of image-text records with the model's processor and chat template.

The text side is the text pipeline's (tokenize.encode_conversations): the chat template renders the messages,
whose `<image>` placeholders are the tokenizer's image token, and labels cover each assistant turn's content and
end-of-turn token. Each image token is then expanded in place to the number of tokens the model's projector
writes for one image (LLaVA's convention: the processor does the same expansion), labelled IGNORE_INDEX, and the
images become the processor's pixel values (or their RGB bytes and the map to those values: ImagePixels). A
record longer than `max_length` after the expansion is dropped with its reason: cutting inside an image's tokens
would leave the model with a partial image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from instune.data.tokenize import Encoded, TokenizeError, encode_conversations
from instune.data.truncate import IGNORE_INDEX

UNLIMITED = 1 << 30
# Shared by the rows that store no pixels or no values (and a batch's pixel map by all its rows): read-only.
EMPTY_PIXELS, EMPTY_VALUES = np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=np.float32)
EMPTY_PIXELS.flags.writeable = EMPTY_VALUES.flags.writeable = False


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
    """The processor's pixel values for a batch of images, as the columns a tokenized row stores them in.

    Calling the image processor costs about 1.4 ms an image on one core (PIL round trips and argument checks),
    more than decoding the image, and prepare calls it for every image it keeps. For images already at the
    processor's input size, a LLaVA/CLIP-style processor's work is a per-channel affine map of the pixels
    (a resize to the same size, rescale, normalise). The map is measured once on a noise image and used only if
    it reproduces the processor's output there. Then a row keeps its images' RGB bytes (`pixels`, uint8) and the
    map (`pixel_map`), and the batch applies it (multimodal_batches.pixel_values): a quarter of the bytes of
    float pixel values to write, store and read (1.35 MB against 339 KB a 336-pixel image), and no float work in
    prepare. Other processors, and images of another size, go through the processor (one call per batch) and the
    row keeps its float `pixel_values`.
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

    def __call__(self, images: list[bytes | np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """(values, map) of `images` (PNG bytes, or RGB arrays (height, width, 3) already decoded), values
        (images, channels, height, width): uint8 RGB with the per-channel map [scale x 3, shift x 3] that turns
        them into the processor's pixel values, or those float32 pixel values and None."""
        from PIL import Image

        if not images:
            dtype = np.float32 if self.scale is None else np.uint8
            return np.zeros((0, 3, self.side, self.side), dtype), self.pixel_map
        arrays = [image if isinstance(image, np.ndarray) else np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
                  for image in images]
        if self.scale is None or any(array.shape != (self.side, self.side, 3) for array in arrays):
            return self._from_processor([Image.fromarray(array) for array in arrays]), None
        return np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2)), self.pixel_map

    @property
    def pixel_map(self) -> np.ndarray | None:
        if self.scale is None:
            return None
        pixel_map = np.concatenate([self.scale, self.shift])
        pixel_map.flags.writeable = False
        return pixel_map


def tokenize_multimodal(records: list[dict], processor, image: ImageTokens, max_length: int,
                        pixels: ImagePixels | None = None, render=None, backend=None) -> list[dict | TokenizeError]:
    """One training example per record ({input_ids, labels, pixels, pixel_map, pixel_values, image_shape}: the
    images as ImagePixels stores them), or its TokenizeError.

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
    values, pixel_map = pixels([png for r in kept for png in r["images"]])
    start = 0
    for row in kept:
        count = len(row.pop("images"))
        own = values[start:start + count]
        start += count
        # A text-only record keeps the (0, channels, height, width) shape, so its rows concatenate with others.
        row["image_shape"] = list(own.shape)
        if pixel_map is None:
            row["pixels"], row["pixel_map"], row["pixel_values"] = EMPTY_PIXELS, EMPTY_VALUES, own.reshape(-1)
        else:
            row["pixels"], row["pixel_map"], row["pixel_values"] = own.reshape(-1), pixel_map, EMPTY_VALUES
    return results
