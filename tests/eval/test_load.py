import json
import shutil

import pytest

from instune.errors import UserError
from instune.eval.evaluate import EvalSettings, evaluate_in_process
from instune.eval.load import adapter_base_path, check_eval_model, is_adapter_dir

SETTINGS = EvalSettings(max_length=64, max_new_tokens=4, batch_size=4)


def test_adapter_dirs_are_told_apart_from_models(tiny_model_dir, tiny_adapter_and_merged):
    adapter_dir, merged_dir = tiny_adapter_and_merged
    assert is_adapter_dir(adapter_dir) and not is_adapter_dir(merged_dir) and not is_adapter_dir(tiny_model_dir)
    assert check_eval_model(str(merged_dir), None) == str(merged_dir.resolve())
    assert check_eval_model(str(adapter_dir), None) == str(adapter_dir.resolve())
    # The adapter's own config names the base it was trained on.
    assert adapter_base_path(adapter_dir, None) == str(tiny_model_dir)
    assert adapter_base_path(adapter_dir, "/elsewhere") == "/elsewhere"


def test_check_eval_model_errors_name_the_field_and_problem(tmp_path, tiny_adapter_and_merged):
    adapter_dir, _ = tiny_adapter_and_merged
    with pytest.raises(UserError, match=r"^--model: .*missing does not exist \(a local path"):
        check_eval_model(str(tmp_path / "missing"), None)
    moved = tmp_path / "moved_adapter"
    shutil.copytree(adapter_dir, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"names base model .*gone.*set model.path"):
        check_eval_model(str(moved), None)
    (moved / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="no adapter_model"):
        check_eval_model(str(moved), None)


def test_adapter_evaluates_like_its_merged_model(tiny_model_dir, tiny_adapter_and_merged, tiny_eval_sets):
    adapter_dir, merged_dir = tiny_adapter_and_merged
    base, _ = evaluate_in_process(str(tiny_model_dir), tiny_eval_sets, SETTINGS)
    adapter, adapter_answers = evaluate_in_process(str(adapter_dir), tiny_eval_sets, SETTINGS)
    merged, merged_answers = evaluate_in_process(str(merged_dir), tiny_eval_sets, SETTINGS)
    assert [r.loss for r in adapter] == pytest.approx([r.loss for r in merged], rel=1e-4)
    assert adapter_answers == merged_answers
    # The adapter is not a no-op: base and tuned losses differ.
    assert all(abs(a.loss - b.loss) > 1e-3 for a, b in zip(adapter, base))


def test_adapter_loads_on_an_explicit_base(tiny_model_dir, tiny_adapter_and_merged, tiny_eval_sets, tmp_path):
    adapter_dir, merged_dir = tiny_adapter_and_merged
    base_copy = tmp_path / "base_copy"
    shutil.copytree(tiny_model_dir, base_copy)
    explicit, _ = evaluate_in_process(str(adapter_dir), tiny_eval_sets[:1], SETTINGS, base_model_path=str(base_copy))
    merged, _ = evaluate_in_process(str(merged_dir), tiny_eval_sets[:1], SETTINGS)
    assert explicit[0].loss == pytest.approx(merged[0].loss, rel=1e-4)
