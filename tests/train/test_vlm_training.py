"""A LLaVA-style model through the per-worker loop: LoRA on the language model and projector with the vision
tower frozen, or full fine-tuning; the images reach the loss, and export writes a loadable model + processor."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from instune.config import VlmEmbeddedConfig
from instune.data.multimodal_tokenize import image_tokens, tokenize_multimodal
from instune.data.prepare_multimodal import TOKENIZED_SCHEMA
from instune.default.vlm import ensure_embedded_vlm
from instune.train.export import export_model
from instune.train.loop import LoopSettings, run_training
from instune.train.methods import MethodSettings
from instune.train.multimodal_batches import collate_multimodal
from instune.train.sessions import FileSession

from .train_helpers import read_metrics, run_many

STEP = "checkpoints/step-{:08d}/trainable.safetensors"
COLOURS = {"red": (230, 20, 20), "blue": (20, 20, 230)}


def _png(rgb) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), rgb).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def vlm_rows(tmp_path_factory):
    """(tiny VLM directory, Parquet files of 16 tokenized rows: 'What colour?' about red or blue images)."""
    root = tmp_path_factory.mktemp("vlm_train")
    settings = VlmEmbeddedConfig(vision_hidden_size=32, hidden_size=64, num_layers=1, num_heads=2,
                                 intermediate_size=128, vocab_size=320)
    model_dir = ensure_embedded_vlm(root / "model", ["What colour is it? red blue"] * 5, settings)
    processor = AutoProcessor.from_pretrained(model_dir)
    records = [{"messages": [{"role": "user", "content": "<image>\nWhat colour is it?"},
                             {"role": "assistant", "content": name}], "images": [_png(rgb)]}
               for _ in range(8) for name, rgb in COLOURS.items()]
    rows = tokenize_multimodal(records, processor, image_tokens(processor), max_length=64)
    table = pa.Table.from_pylist([{"id": str(i), "source": "s", "domain": "colour", "metadata": "{}", **row}
                                  for i, row in enumerate(rows)], schema=TOKENIZED_SCHEMA)
    (root / "rows").mkdir()
    pq.write_table(table, root / "rows" / "part-0.parquet")
    return model_dir, [str(root / "rows" / "part-0.parquet")]


def _train(model_dir, files, output, method: MethodSettings, steps: int, lr: float, **extra):
    settings = LoopSettings(model_path=str(model_dir), total_steps=steps, method=method, lr=lr, warmup_ratio=0,
                            micro_batch_size=4, log_every=1, checkpoint_every=steps, **extra)
    run_training(settings, FileSession({"train": files}, str(output)))
    return read_metrics(output)


def test_collate_pads_rows_and_stacks_images_in_order():
    batch = collate_multimodal({"input_ids": [[5, 6, 7], [8]], "labels": [[-100, 6, 7], [-100]],
                                "pixels": [[], []], "pixel_map": [[], []],
                                "pixel_values": [[1.0] * 12, [2.0] * 24], "image_shape": [[1, 3, 2, 2], [2, 3, 2, 2]]})
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]
    assert batch["pixel_values"].shape == (3, 3, 2, 2) and batch["pixel_values"][:, 0, 0, 0].tolist() == [1, 2, 2]
    # RGB bytes through each channel's scale and shift; a text-only row (no images) adds none.
    pixel_map = [0.5, 1.0, 2.0, -1.0, 0.0, 1.0]
    batch = collate_multimodal({"input_ids": [[5], [6]], "labels": [[5], [6]], "pixels": [[2] * 12, []],
                                "pixel_map": [pixel_map, pixel_map], "pixel_values": [[], []],
                                "image_shape": [[1, 3, 2, 2], [0, 3, 2, 2]]})
    assert batch["pixel_values"].shape == (1, 3, 2, 2) and batch["pixel_values"][0, :, 0, 0].tolist() == [0, 2, 5]


def _answer(model, processor, rgb) -> str:
    prompt = "<|im_start|>user\n<image>\nWhat colour is it?<|im_end|>\n<|im_start|>assistant\n"
    inputs = processor(images=[Image.new("RGB", (32, 32), rgb)], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_lora_adapts_language_model_and_projector_with_vision_tower_frozen(vlm_rows, tmp_path):
    model_dir, files = vlm_rows
    metrics = _train(model_dir, files, tmp_path / "lora", MethodSettings(method="lora", r=8, alpha=16, dropout=0.0),
                     steps=2, lr=1e-2)
    assert len(metrics) == 2 and metrics[0]["trainable_params"] < metrics[0]["total_params"] / 5
    saved = load_file(str(tmp_path / "lora" / STEP.format(2)))
    assert any("multi_modal_projector.linear_1.lora_A" in n for n in saved)
    assert any("language_model" in n and "q_proj.lora_A" in n for n in saved)
    assert not any("vision_tower" in n for n in saved)
    adapter_dir, merged_dir = export_model(tmp_path / "lora" / STEP.format(2).rsplit("/", 1)[0], str(model_dir),
                                           str(model_dir), "lora", tmp_path / "export")
    model = AutoModelForImageTextToText.from_pretrained(merged_dir)
    assert type(AutoProcessor.from_pretrained(merged_dir).image_processor).__name__ == "CLIPImageProcessorPil"
    assert (adapter_dir / "adapter_config.json").is_file()
    base = AutoModelForImageTextToText.from_pretrained(model_dir)
    key = "embeddings.patch_embedding.weight"
    assert torch.equal(model.model.vision_tower.state_dict()[key], base.model.vision_tower.state_dict()[key])
    projector = "linear_1.weight"
    assert not torch.equal(model.model.multi_modal_projector.state_dict()[projector],
                           base.model.multi_modal_projector.state_dict()[projector])


# ~25 s on 2 cores: 24 optimizer steps are what the tiny random model needs to tell the colours apart, and this is
# the one test that shows an image's pixels reach the answer through the loop.
@pytest.mark.slow
def test_full_fine_tuning_learns_from_the_image_and_keeps_the_vision_tower(vlm_rows, tmp_path):
    model_dir, files = vlm_rows
    metrics = _train(model_dir, files, tmp_path / "full", MethodSettings(method="full"), steps=24, lr=4e-3)
    losses = [m["loss"] for m in metrics]
    assert losses[-1] < 0.2 * losses[0]
    base = AutoModelForImageTextToText.from_pretrained(model_dir).state_dict()
    saved = load_file(str(tmp_path / "full" / STEP.format(24)))
    vision = [n for n in saved if "vision_tower" in n]
    assert vision and all(torch.equal(saved[n], base[n]) for n in vision)
    # The answer depends on the image: the tuned model tells red from blue (the prompt is the same).
    export_model(tmp_path / "full" / STEP.format(24).rsplit("/", 1)[0], str(model_dir), str(model_dir), "full",
                 tmp_path / "export")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "export" / "merged").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "export" / "merged")
    assert [_answer(model, processor, rgb) for rgb in COLOURS.values()] == list(COLOURS)


def test_the_vision_tower_trains_when_asked(vlm_rows, tmp_path):
    model_dir, files = vlm_rows
    base = AutoModelForImageTextToText.from_pretrained(model_dir).state_dict()
    _train(model_dir, files, tmp_path / "unfrozen", MethodSettings(method="full"), steps=1, lr=1e-3,
           train_vision_tower=True)
    saved = load_file(str(tmp_path / "unfrozen" / STEP.format(1)))
    vision = [n for n in saved if "vision_tower" in n and n.endswith("q_proj.weight")]
    assert vision and not torch.equal(saved[vision[0]], base[vision[0]])


def test_ddp_on_two_workers_with_image_and_text_only_rows(vlm_rows, tmp_path):
    """Rows without images leave the projector without a gradient on a worker; DDP still steps (a mix with
    text-only instruction data), with image rows and with text-only rows alone."""
    model_dir, files = vlm_rows
    processor = AutoProcessor.from_pretrained(model_dir)
    records = [{"messages": [{"role": "user", "content": "What colour is it?"},
                             {"role": "assistant", "content": name}], "images": []} for name in COLOURS] * 8
    rows = tokenize_multimodal(records, processor, image_tokens(processor), max_length=64)
    assert all(r["image_shape"][0] == 0 for r in rows)
    table = pa.Table.from_pylist([{"id": str(i), "source": "t", "domain": "text", "metadata": "{}", **r}
                                  for i, r in enumerate(rows)], schema=TOKENIZED_SCHEMA)
    pq.write_table(table, tmp_path / "text.parquet")
    base = dict(model_path=str(model_dir), total_steps=2, lr=1e-3, warmup_ratio=0, micro_batch_size=4, log_every=1)
    lora = MethodSettings(method="lora", r=4)
    runs = [{"settings": LoopSettings(**base, method=lora), "train": train, "output": tmp_path / name}
            for name, train in (("images", files), ("text", [str(tmp_path / "text.parquet")]))]
    run_many(runs, tmp_path, nproc=2)
    for name in ("images", "text"):
        losses = [m["loss"] for m in read_metrics(tmp_path / name)]
        assert len(losses) == 2 and all(4.0 < loss < 8.0 for loss in losses)
