"""Batches of image-text examples (prepare_multimodal's tokenized rows) as the loop's tensors.

Rows are not packed: an example's images belong to its own tokens, and LLaVA-style models find them by the
image token's positions. Rows are right-padded to the longest in the batch with unlabelled tokens, which a
causal model never attends to from a real position, so no attention mask is needed (as for packed rows).
`pixel_values` holds every image of the batch, row after row, in the order their tokens appear: a row's stored
RGB bytes through its per-channel map, or its stored pixel values (multimodal_tokenize.ImagePixels).
"""

from __future__ import annotations

import numpy as np
import torch

from instune.data.truncate import IGNORE_INDEX

MULTIMODAL_COLUMNS = ("input_ids", "labels", "pixels", "pixel_map", "pixel_values", "image_shape")


def collate_multimodal(columns: dict) -> dict[str, torch.Tensor]:
    """{input_ids, labels, position_ids, pixel_values} from per-row sequences of MULTIMODAL_COLUMNS."""
    ids = [np.asarray(x, dtype=np.int64) for x in columns["input_ids"]]
    labels = [np.asarray(x, dtype=np.int64) for x in columns["labels"]]
    length = max(len(x) for x in ids)
    input_ids = np.zeros((len(ids), length), dtype=np.int64)  # the pad id is never attended to nor a target
    padded_labels = np.full((len(ids), length), IGNORE_INDEX, dtype=np.int64)
    for row, (row_ids, row_labels) in enumerate(zip(ids, labels)):
        input_ids[row, :len(row_ids)] = row_ids
        padded_labels[row, :len(row_labels)] = row_labels
    images = [pixel_values(pixels, pixel_map, values, shape) for pixels, pixel_map, values, shape
              in zip(columns["pixels"], columns["pixel_map"], columns["pixel_values"], columns["image_shape"])
              if int(shape[0])]
    batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(padded_labels),
             "position_ids": torch.arange(length).expand(len(ids), length).clone()}
    if images:
        batch["pixel_values"] = torch.from_numpy(np.concatenate(images))
    return batch


def pixel_values(pixels, pixel_map, values, shape) -> np.ndarray:
    """One row's images as the processor's pixel values, (images, channels, height, width) float32."""
    shape = [int(s) for s in shape]
    if len(pixel_map) == 0:
        return np.asarray(values, dtype=np.float32).reshape(shape)
    scale_shift = np.asarray(pixel_map, dtype=np.float32).reshape(2, 1, -1, 1, 1)
    return np.asarray(pixels, dtype=np.uint8).reshape(shape).astype(np.float32) * scale_shift[0] + scale_shift[1]
