"""The VLM sweep over the share of image-text examples: the rows a share trains on, the checks before Ray starts,
and a real two-trial Ray Tune sweep with its table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instune.config import VlmExperimentConfig, load_config
from instune.errors import UserError
from instune.vlm_run import TEXT_SOURCE, training_rows

ROOT = Path(__file__).resolve().parents[2]


def test_a_share_keeps_the_row_count_and_takes_the_first_rows_of_each_kind(tmp_path):
    ids = [f"i{k}" for k in range(8)] + [f"t{k}" for k in range(10)]
    table = pa.table({"id": ids, "source": ["image_tasks"] * 8 + [TEXT_SOURCE] * 10})
    pq.write_table(table, tmp_path / "part-0.parquet")
    picked = {share: training_rows(tmp_path, share, seed=0)["id"].to_pylist() for share in (0.0, 0.25, 0.5, 1.0)}
    assert sorted(picked[1.0]) == [f"i{k}" for k in range(8)]
    assert sorted(picked[0.0]) == [f"t{k}" for k in range(8)]
    assert sorted(picked[0.25]) == ["i0", "i1"] + [f"t{k}" for k in range(6)]
    assert sorted(picked[0.5]) == ["i0", "i1", "i2", "i3", "t0", "t1", "t2", "t3"]
    assert picked[0.5] != sorted(picked[0.5])  # shuffled: the loop reads its shard in order
    assert picked[0.5] == training_rows(tmp_path, 0.5, seed=0)["id"].to_pylist()


def test_a_trial_cannot_vary_what_the_sweep_makes_once_and_a_share_needs_the_corpus():
    from instune.tune.vlm_sweep import check_vlm_sweep

    config = ROOT / "configs/vlm_sweep.yaml"
    loaded = load_config(config, ["output_dir=/tmp/x"], schema=VlmExperimentConfig)
    assert list(loaded.sweep.params) == ["data.multimodal_share"]
    check_vlm_sweep(loaded)
    for path, message in (("model.embedded.hidden_size", "model is fixed for the whole sweep"),
                          ("train.lr_typo", "no such config setting")):
        swept = load_config(config, ["output_dir=/tmp/x", f"sweep.params={{'{path}': {{choice: [1, 2]}}}}"],
                            schema=VlmExperimentConfig)
        with pytest.raises(UserError, match=f"sweep.params.{path}: .*{message}"):
            check_vlm_sweep(swept)
    tree = {"output_dir": "/tmp/x", "data": {"sources": [{"name": "a", "path": "a.json"}],
                                             "eval_sources": [{"name": "b", "path": "b.json"}],
                                             "multimodal_share": 0.5}}
    with pytest.raises(ValueError, match="multimodal_share: the text-only examples come from the embedded corpus"):
        VlmExperimentConfig.model_validate(tree)


# ~2 min on 2 cores: one prepare, the base model scored once, two trials each with a Train run and a scoring.
@pytest.mark.slow
def test_two_trials_over_the_share_report_the_gap_before_and_after(tmp_path):
    out = tmp_path / "sweep"
    sets = {"output_dir": out, "corpus.train_per_domain": 8, "corpus.eval_per_domain": 4,
            "corpus.in_domain": "[count, colour]", "corpus.out_of_domain": "[digit]",
            "sweep.params": "{data.multimodal_share: {choice: [0.5, 1.0]}}", "train.max_steps": 2,
            "train.micro_batch_size": 4, "train.log_every": 1, "scaling.num_workers": 1, "eval.retrieval_images": 4,
            "model.embedded.hidden_size": 64, "model.embedded.intermediate_size": 128, "model.embedded.num_layers": 1,
            "model.embedded.vision_hidden_size": 32, "model.embedded.vision_layers": 1}
    args = [a for key, value in sets.items() for a in ("--set", f"{key}={value}")]
    done = subprocess.run([sys.executable, "-m", "instune.vlm_run", str(ROOT / "configs/vlm_sweep.yaml"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((out / "sweep/results.json").read_text())
    assert [t["values"] for t in results["trials"]] == [{"data.multimodal_share": 0.5},
                                                       {"data.multimodal_share": 1.0}]
    assert results["failed"] == [] and results["in_domain"] == ["count", "colour"]
    for trial in results["trials"]:
        assert sorted(trial["after"]) == ["colour", "count", "digit"]
        assert all(trial["after"][d]["examples"] == 4 for d in trial["after"])
        assert set(trial["gap_after"]) >= {"exact_match", "i2t_r1", "t2i_r1"}
        # Each trial trained its own 2 steps (its Train run is under its own directory).
        metrics = (out / "sweep/trials" / trial["trial_id"] / "train/run/metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in metrics] == [1, 2]
    assert set(results["gap_before"]) >= {"exact_match", "i2t_r1", "t2i_r1"}
    table = (out / "sweep/results.md").read_text()
    assert table.count("\n") == 4 and "gap exact_match (before -> after)" in table  # header, rule, two trials
    assert table in done.stdout + "\n"
    # Prepared once for both trials: 16 image-text rows, and enough text-only ones for any share.
    data = json.loads((out / "data/manifest.json").read_text())["sources"]
    assert data["image_tasks"]["tokenized"] == 16 and data["text_tasks"]["read"] == 32
    assert data["text_tasks"]["tokenized"] >= 16  # what a share of 0 needs, after exact dedup


def test_the_table_has_one_row_per_trial_with_each_gap_before_and_after():
    from instune.tune.vlm_sweep import sweep_table

    scores = {"count": {"exact_match": 0.5}, "colour": {"exact_match": 0.75}, "digit": {"exact_match": 0.25}}
    results = {"params": ["data.multimodal_share"], "in_domain": ["count", "colour"], "out_of_domain": ["digit"],
               "gap_before": {"exact_match": 0.0, "i2t_r1": -0.1},
               "trials": [{"values": {"data.multimodal_share": 0.5}, "after": scores,
                           "gap_after": {"exact_match": 0.375, "i2t_r1": 0.2}}]}
    header, _, row = sweep_table(results).splitlines()
    assert header.split(" | ")[:4] == ["| data.multimodal_share", "exact_match in", "exact_match out",
                                       "gap exact_match (before -> after)"]
    assert [c.strip() for c in row.strip("|").split("|")] == ["0.5", "0.625", "0.25", "+0.00 -> +0.38",
                                                               "-0.10 -> +0.20", "-", "-", "-"]
