"""Export: every method's checkpoint becomes an adapter (or weights) directory and, where the method can
merge, a full model that transformers loads and generates with, giving the trained model's outputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from .train_helpers import write_packed_rows
from transformers import AutoModelForCausalLM

from instune.data.outcome import OutcomeMarkers, read_markers_file
from instune.train.checkpoint import WEIGHTS_FILE
from instune.train.export import BITFIT_FILE, export_model
from instune.train.loop import LoopSettings, run_training
from instune.train.methods import MethodSettings
from instune.train.sessions import FileSession

METHODS = {
    "lora": MethodSettings(method="lora", r=4, dropout=0.0, modules_to_save=["lm_head"]),
    "dora": MethodSettings(method="lora", r=4, dropout=0.0, use_dora=True, use_rslora=True),
    "ia3": MethodSettings(method="ia3"),
    "bitfit": MethodSettings(method="bitfit"),
    "full": MethodSettings(method="full"),
    "lisa": MethodSettings(method="lisa", lisa_layers=1, lisa_period=1),
    "prefix": MethodSettings(method="prefix", num_virtual_tokens=3),
    "prompt": MethodSettings(method="prompt", num_virtual_tokens=3),
}
PROMPT = torch.tensor([[5, 9, 14, 20, 7]])


@pytest.fixture(scope="module")
def padded_rows(tmp_path_factory):
    return write_packed_rows(tmp_path_factory.mktemp("padded") / "train", 16, packed=False)


def train_two_steps(tiny_model, rows, method: MethodSettings, output):
    settings = LoopSettings(model_path=str(tiny_model), total_steps=2, micro_batch_size=4, log_every=2,
                            lr=5e-2, warmup_ratio=0, method=method)
    run_training(settings, FileSession({"train": [str(rows / "part-0.parquet")]}, str(output)))
    return output / "checkpoints/step-00000002"


def logits(model, ids=PROMPT):
    with torch.no_grad():
        return model(input_ids=ids).logits[:, -ids.size(1):]


@pytest.mark.parametrize("name", list(METHODS))
def test_export_writes_what_transformers_and_peft_load(name, tiny_model, padded_rows, tmp_path):
    from peft import PeftModel

    method = METHODS[name]
    checkpoint = train_two_steps(tiny_model, padded_rows, method, tmp_path / "run")
    # A run trained with outcome markers records them beside what it exports (for `instune chat MODEL`).
    markers = {"field": "outcome", "success": "Succeed.", "failure": "Fail.", "position": "system"}
    adapter, merged = export_model(checkpoint, str(tiny_model), str(tiny_model), method.method, tmp_path / "out",
                                   markers)
    for exported in (adapter, merged):
        assert exported is None or read_markers_file(exported) == OutcomeMarkers(**markers)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model)).eval()
    base_logits = logits(base)

    if method.method in ("prefix", "prompt"):
        assert merged is None and not (tmp_path / "out" / "merged").exists()
        tuned = PeftModel.from_pretrained(base, str(adapter)).eval()
        assert not torch.allclose(logits(tuned), base_logits, atol=1e-4)
        out = tuned.generate(input_ids=PROMPT, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert out.shape[1] == PROMPT.shape[1] + 3
        return

    loaded = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    merged_logits = logits(loaded)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-4)  # training changed the model
    if method.method in ("lora", "ia3"):
        # The merged model computes what base + adapter computes.
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model)), str(adapter))
        torch.testing.assert_close(merged_logits, logits(tuned.eval()), atol=1e-4, rtol=1e-4)
    else:
        # The merged weights are the checkpoint's (all of them, or BitFit's biases over the base).
        trained = load_file(str(checkpoint / WEIGHTS_FILE))
        weights = dict(loaded.named_parameters())
        for n, w in trained.items():
            torch.testing.assert_close(weights[n].detach(), w)
        if method.method == "bitfit":
            assert load_file(str(adapter / BITFIT_FILE)).keys() == trained.keys()
            assert json.loads((adapter / "method.json").read_text())["method"] == "bitfit"
    out = loaded.generate(input_ids=PROMPT, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == PROMPT.shape[1] + 3
    assert (merged / "tokenizer.json").is_file() and (adapter / "tokenizer.json").is_file()
