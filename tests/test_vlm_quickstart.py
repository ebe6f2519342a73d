"""The multimodal quickstart end to end: image tasks -> Ray Data prepare -> Ray Train (2 workers, LoRA on LM and
projector) -> generation and zero-shot retrieval per domain, before and after, with the gap."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_vlm_quickstart_config_loads():
    from instune.config import VlmExperimentConfig, load_config
    from instune.errors import UserError

    config = load_config(ROOT / "configs/vlm_quickstart.yaml", ["output_dir=/tmp/x"], schema=VlmExperimentConfig)
    assert config.corpus.dir == "/tmp/x/corpus" and config.peft.method == "full"
    assert not config.model.train_vision_tower
    with pytest.raises(UserError, match="model.embedded: .*image_size 30 is not a multiple of patch_size 8"):
        load_config(ROOT / "configs/vlm_quickstart.yaml", ["model.embedded.image_size=30"], schema=VlmExperimentConfig)
    # The language model's sizes are checked as the text model's are (EmbeddedModelConfig), the tower's too.
    for override, message in (("hidden_size=130", "hidden_size 130 is not divisible by num_heads 4"),
                               ("vision_heads=3", "vision_hidden_size 64 is not divisible by vision_heads 3")):
        with pytest.raises(UserError, match=f"model.embedded: .*{message}"):
            load_config(ROOT / "configs/vlm_quickstart.yaml", [f"model.embedded.{override}"],
                        schema=VlmExperimentConfig)


# About 3 minutes on 2 cores: two Ray stages and four model evaluations, the one test of the whole path.
@pytest.mark.slow
def test_vlm_quickstart_runs_prepare_train_eval(tmp_path):
    out = tmp_path / "vlm"
    result = subprocess.run(
        [sys.executable, "-m", "instune", "vlm", str(ROOT / "configs/vlm_quickstart.yaml"),
         "--set", f"output_dir={out}", "--set", "corpus.train_per_domain=20", "--set", "corpus.eval_per_domain=6",
         "--set", "train.max_steps=4", "--set", "train.log_every=2", "--set", "eval.retrieval_images=6"],
        capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    domains = ["count", "colour", "position", "digits_real", "digit", "colour_heldout"]
    assert results["in_domain"] + results["out_of_domain"] == domains
    assert results["data"] == {"image_tasks": {"read": 80, "kept": 80, "rejected": 0, "tokenized": 80, "dropped": 0,
                                               "rejects": []}}
    for when in ("before", "after"):
        for domain in domains:
            row = results[when][domain]
            assert row["examples"] == 6 and row["images"] == 6
            assert 0 <= row["i2t_r1"] <= row["i2t_r5"] <= 1 and 0 <= row["t2i_r1"] <= row["t2i_r5"] <= 1
        assert set(results["gap"][when]) >= {"exact_match", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"}
    metrics = [json.loads(line) for line in (out / "train/run/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4]
    assert "gap (in - out)" in result.stdout and "colour_heldout" in result.stdout
    report = (out / "report.md").read_text()  # instune/report/vlm.py; its content is tested in tests/report
    assert "## zero-shot retrieval per domain" in report and "| colour_heldout | out |" in report
    assert (out / "resolved_config.yaml").is_file()
    assert yaml.safe_load((out / "model/merged/config.json").read_text())["model_type"] == "llava"


def test_results_table_shows_before_after_per_domain_and_the_gap():
    from instune.vlm_run import results_table

    row = {"exact_match": 0.5, "i2t_r1": 0.25, "i2t_chance_r1": 0.1, "i2t_r5": 0.75, "t2i_r1": 0.2, "t2i_r5": 0.6}
    results = {"in_domain": ["count"], "out_of_domain": ["digit"],
               "before": {"count": row, "digit": {**row, "exact_match": 0.0}},
               "after": {"count": {**row, "exact_match": 1.0}, "digit": row},
               "gap": {"before": {"exact_match": 0.5}, "after": {"exact_match": 0.5}}}
    lines = results_table(results).splitlines()
    assert lines[1].split()[:5] == ["count", "in", "0.50", "->", "1.00"]
    assert lines[2].split()[:5] == ["digit", "out", "0.00", "->", "0.50"]
    assert lines[3].startswith("gap (in - out)") and "0.50 -> 0.50" in lines[3] and lines[3].endswith("-")


def test_images_are_resized_to_the_models_input_side(tmp_path):
    from transformers import CLIPImageProcessor

    from instune.config import VlmExperimentConfig, load_config
    from instune.vlm_run import image_limits

    config = load_config(ROOT / "configs/vlm_quickstart.yaml", [f"output_dir={tmp_path}",
                                                                  "model.embedded.image_size=16"],
                         schema=VlmExperimentConfig)
    assert image_limits(config, "unused").size == 16  # the embedded model's image_size
    CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}).save_pretrained(tmp_path)
    config = load_config(ROOT / "configs/vlm_quickstart.yaml", [f"output_dir={tmp_path}", f"model.path={tmp_path}",
                                                                  "model.embedded.image_size=16"],
                         schema=VlmExperimentConfig)
    limits = image_limits(config, str(tmp_path))
    assert (limits.size, limits.min_side) == (48, config.data.images.min_side)  # model.path: its processor's side
