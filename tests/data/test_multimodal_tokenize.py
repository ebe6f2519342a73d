import io

import numpy as np
from PIL import Image
from transformers import AutoProcessor

from instune.data.multimodal_tokenize import image_tokens, tokenize_multimodal
from instune.data.tokenize import TokenizeError
from instune.data.truncate import IGNORE_INDEX


def png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_tokens_in_place_and_labels_on_assistant_text_only(tiny_vlm):
    processor = AutoProcessor.from_pretrained(tiny_vlm)
    image = image_tokens(processor)
    assert image.count == 16  # 32x32 image, 8x8 patches, class token dropped
    records = [
        {"messages": [{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": "red"}],
         "images": [png((255, 0, 0))]},
        {"messages": [{"role": "user", "content": "<image> then <image>"}, {"role": "assistant", "content": "two"}],
         "images": [png((255, 0, 0)), png((0, 0, 255))]},
        {"messages": [{"role": "user", "content": "<image>" * 9}, {"role": "assistant", "content": "long"}],
         "images": [png((0, 0, 0))] * 9},
    ]
    first, second, too_long = tokenize_multimodal(records, processor, image, max_length=100)
    ids, labels = first["input_ids"], first["labels"]
    positions = np.flatnonzero(ids == image.token_id)
    assert len(positions) == 16 and np.all(np.diff(positions) == 1)  # one contiguous block, where <image> was
    tokenizer = processor.tokenizer
    assert tokenizer.decode(ids[:positions[0]]) == "<|im_start|>user\n"
    assert tokenizer.decode(ids[positions[-1] + 1:]).startswith("\nWhat colour?<|im_end|>")
    assert tokenizer.decode(labels[labels != IGNORE_INDEX]) == "red<|im_end|>"
    # The tiny VLM's CLIP processor is a per-channel map of the pixels: rows keep RGB bytes and the map.
    assert first["image_shape"] == [1, 3, 32, 32] and len(first["pixels"]) == 3 * 32 * 32
    assert len(first["pixel_map"]) == 6 and len(first["pixel_values"]) == 0
    assert (second["input_ids"] == image.token_id).sum() == 32 and second["image_shape"][0] == 2
    # Two different images, two different pixel blocks, in order.
    pixels = second["pixels"].reshape(second["image_shape"]).astype(float)
    assert pixels[0, 0].mean() > pixels[1, 0].mean() and pixels[1, 2].mean() > pixels[0, 2].mean()
    assert isinstance(too_long, TokenizeError) and "over model.max_length 100" in str(too_long)


def test_image_pixels_equal_the_processors_own_values(tiny_vlm):
    import copy

    from instune.data.multimodal_tokenize import ImagePixels
    from instune.train.multimodal_batches import pixel_values

    image_processor = AutoProcessor.from_pretrained(tiny_vlm).image_processor

    def noise_pngs(side, count=3):
        pngs = []
        for seed in range(count):
            buffer = io.BytesIO()
            Image.effect_noise((side, side), 40 + 10 * seed).convert("RGB").save(buffer, format="PNG")
            pngs.append(buffer.getvalue())
        return pngs

    def processors_own(pngs, processor):
        images = [Image.open(io.BytesIO(p)).convert("RGB") for p in pngs]
        return processor(images=images, return_tensors="np")["pixel_values"]

    def batch_values(values, pixel_map):  # what a training batch computes from a row's columns
        if pixel_map is None:
            return pixel_values([], [], values.reshape(-1), values.shape)
        return pixel_values(values.reshape(-1), pixel_map, [], values.shape)

    pixels = ImagePixels(image_processor)
    assert pixels.scale is not None  # CLIP's rescale + normalise at the input size: the numpy map
    for side, stored in ((32, np.uint8), (40, np.float32)):  # 40: not the input size, the processor resizes
        pngs = noise_pngs(side)
        values, pixel_map = pixels(pngs)
        assert values.dtype == stored and (pixel_map is None) == (stored == np.float32)
        assert np.abs(batch_values(values, pixel_map) - processors_own(pngs, image_processor)).max() < 1e-5
        # Decoded arrays (what prepare passes: the pixels its PNGs were written from) give the same values.
        arrays = [np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in pngs]
        assert np.array_equal(pixels(arrays)[0], values)
    assert pixels([])[0].shape == (0, 3, 32, 32)
    cropping = copy.deepcopy(image_processor)
    cropping.do_center_crop, cropping.crop_size = True, {"height": 24, "width": 24}
    assert ImagePixels(cropping).scale is None  # not a map of each pixel: every call goes to the processor
    pngs = noise_pngs(32)
    values, pixel_map = ImagePixels(cropping)(pngs)
    assert pixel_map is None and np.abs(batch_values(values, None) - processors_own(pngs, cropping)).max() < 1e-6
