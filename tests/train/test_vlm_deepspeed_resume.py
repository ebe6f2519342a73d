"""A LLaVA-style model under DeepSpeed on 1 and 2 workers, killed mid-run and resumed: the same weights as an
unbroken run, the frozen vision tower untouched by ZeRO-3's partitioning, and the merged VLM exported from the
resumed ZeRO-3 checkpoint with its processor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from instune.train.export import export_model
from instune.train.loop import CRASH_MARKER_ENV, LoopSettings
from instune.train.methods import MethodSettings

from .test_vlm_training import vlm_rows  # noqa: F401  (the fixture: a tiny VLM and 16 image-text rows)
from .train_helpers import read_metrics, run_many, run_torchrun

STEP_4 = "checkpoints/step-00000004"


# ~1.5 min on 2 busy cores: three torchrun launches (1 worker; 2 workers killed; the same 2 workers resumed).
@pytest.mark.slow
def test_zero3_on_two_workers_killed_and_resumed_matches_zero2_on_one(vlm_rows, tmp_path):  # noqa: F811
    """Every step is one pass over all 16 rows (1 worker x 16, 2 workers x 8), so 1 and 2 workers take the same
    steps. Full fine-tuning: ZeRO-3 partitions the frozen vision tower's weights too, and they must come back
    whole and unchanged in the checkpoint and the export."""
    model_dir, files = vlm_rows
    common = dict(model_path=str(model_dir), total_steps=4, method=MethodSettings(method="full"), lr=1e-3,
                  warmup_ratio=0.0, log_every=1, checkpoint_every=2, strategy="deepspeed")
    one = tmp_path / "one"
    run_many([{"settings": LoopSettings(**common, micro_batch_size=16, zero_stage=2), "train": files,
               "output": one}], tmp_path, nproc=1)

    killed = LoopSettings(**common, micro_batch_size=8, zero_stage=3)
    marker = tmp_path / "crash_at_step"
    marker.write_text("3")  # the last worker dies as step 3 starts; step 2 has the latest checkpoint
    output = tmp_path / "killed"
    rows_dir = Path(files[0]).parent
    run_torchrun(killed, rows_dir, output, 2, env={CRASH_MARKER_ENV: str(marker)}, expect_failure=True)
    assert not marker.exists() and [m["step"] for m in read_metrics(output)] == [1, 2]
    run_torchrun(killed, rows_dir, output, 2)

    assert [m["step"] for m in read_metrics(output)] == [1, 2, 3, 4]
    losses = [m["loss"] for m in read_metrics(output)]
    assert losses == pytest.approx([m["loss"] for m in read_metrics(one)], abs=1e-4)
    assert losses[-1] < losses[0] - 0.1  # the steps moved the model
    resumed, straight = load_file(str(output / STEP_4 / "trainable.safetensors")), \
        load_file(str(one / STEP_4 / "trainable.safetensors"))
    assert resumed.keys() == straight.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-4, msg=name)

    base = AutoModelForImageTextToText.from_pretrained(model_dir).state_dict()
    vision = [n for n in resumed if ".vision_tower." in f".{n}"]
    assert vision and all(torch.equal(resumed[n], base[n]) for n in vision)
    trained = [n for n in resumed if n not in vision and not torch.equal(resumed[n], base[n])]
    assert any("multi_modal_projector" in n for n in trained) and any("language_model" in n for n in trained)

    _, merged = export_model(output / STEP_4, str(model_dir), str(model_dir), "full", tmp_path / "export")
    exported = AutoModelForImageTextToText.from_pretrained(merged).state_dict()
    assert all(torch.equal(exported[n], resumed[n]) for n in resumed)
    processor = AutoProcessor.from_pretrained(merged)
    assert processor.image_token == "<image>" and processor.tokenizer.chat_template
