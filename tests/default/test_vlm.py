import numpy as np
import torch
from PIL import Image

from instune.config import VlmEmbeddedConfig
from instune.default.vlm import IMAGE_TOKEN, ensure_embedded_vlm, load_vlm, patches_per_image

SETTINGS = VlmEmbeddedConfig(vision_hidden_size=32, hidden_size=64, num_layers=1, num_heads=2,
                             intermediate_size=128, vocab_size=320)


def test_embedded_vlm_builds_offline_and_gives_a_loss_with_images(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    directory = ensure_embedded_vlm(tmp_path / "vlm", ["how many red circles", "the digit 7"], SETTINGS)
    assert ensure_embedded_vlm(directory, ["other texts"], SETTINGS) == directory  # reused, not rebuilt
    model, processor = load_vlm(directory)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"
    images = [Image.fromarray(np.full((40, 50, 3), 200, dtype=np.uint8)) for _ in range(2)]
    text = [f"<|im_start|>user\n{IMAGE_TOKEN}\nHow many?<|im_end|>\n"] * 2
    batch = processor(images=images, text=text, return_tensors="pt")
    image_id = model.config.image_token_index
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert (batch["input_ids"] == image_id).sum(dim=1).tolist() == [patches_per_image(SETTINGS)] * 2
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == image_id, -100)
    out = model(**batch, labels=labels)
    assert torch.isfinite(out.loss) and 4.0 < out.loss.item() < 8.0  # about ln(vocab) at initialisation
    # The image changes the prediction: the vision tower and projector are wired in.
    other = processor(images=[Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8))] * 2, text=text,
                      return_tensors="pt")
    assert not torch.allclose(model(**other).logits, out.logits)
