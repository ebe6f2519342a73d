"""`instune prepare` for preference pairs on real Ray: the accounting, dedup, tokenized sides, and reference
log-probs computed on the actor pool equal to a direct computation on the embedded model."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
from transformers import AutoModelForCausalLM

from instune.config import validate_config
from instune.data.prepare_pairs import prepare_pairs
from instune.data.tokenize import IGNORE_INDEX

SEQ_LEN = 64
# One prepare with its reference actor pool: ~30 s on an idle laptop, more on a busy 2-core machine.
pytestmark = pytest.mark.slow


def pair_file(path) -> str:
    rows = [{"prompt": f"What is {a} + {b}?", "chosen": str(a + b), "rejected": str(a + b + 1)}
            for a in range(3) for b in range(4)]  # 12 good pairs
    rows.append(dict(rows[0]))  # an exact duplicate
    rows.append({"prompt": "q", "chosen": "same", "rejected": "same"})  # identical sides
    rows.append({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"})
    rows.append({"prompt": "Say it all.", "chosen": "ok", "rejected": "long " * 200})  # cannot fit: dropped
    # Fits once its prompt is shortened from the left.
    rows.append({"prompt": "Read this first. " * 30 + "Then say yes.", "chosen": "yes", "rejected": "no"})
    near = {"prompt": "Tell me about the old river that runs past the village and the mill", "chosen":
            "The river is wide and slow and the mill still turns", "rejected": "I do not know"}
    rows.append(near)
    rows.append({**near, "prompt": near["prompt"].replace("Tell", "tell")})  # a near-duplicate: not exact
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def prepared(local_ray, model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pairs")
    config = validate_config({
        "name": "p", "output_dir": str(tmp / "out"),
        "model": {"path": model_dir, "max_length": SEQ_LEN},
        "data": {"sources": [{"name": "math", "path": pair_file(tmp / "pairs.jsonl")}], "truncation": "prompt_left",
                 "validation_fraction": 0.25, "filters": {"quality": None},
                 "dedup": {"near": {}}},
        "train": {"objective": "simpo"}, "dpo": {"batch_size": 3}})
    # Prepared as a sweep of simpo against dpo prepares them: SimPO needs no reference, but the dpo trials
    # will, so the reference's log-probs are computed once for both.
    manifest = prepare_pairs(config, model_dir, tmp / "data", model_path=model_dir, objectives=["simpo", "dpo"])
    return manifest, tmp / "data"


def rows_of(directory) -> list[dict]:
    return pads.dataset(str(directory), format="parquet").to_table().to_pylist()


def test_every_pair_read_is_kept_or_rejected_with_its_reason(prepared):
    manifest, data_dir = prepared
    counts = manifest["sources"]["math"]
    assert (counts["read"], counts["kept"], counts["rejected"]) == (19, 15, 4)
    assert (manifest["objective"], manifest["reference"]) == ("simpo", "precompute")  # for the dpo trials
    reasons = {(r["stage"], r["reason"].split(":")[0], r["count"]) for r in counts["rejects"]}
    assert reasons == {("normalise", "chosen is identical to rejected", 1),
                       ("dedup:exact", "exact duplicate of an earlier pair", 1),
                       ("tokenize", "the rejected response has 603 tokens", 1),
                       ("dedup:near", "near-duplicate of math", 1)}, reasons
    splits = manifest["splits"]
    assert splits["train"]["rows"] + splits["validation"]["rows"] == counts["kept"]
    assert splits["validation"]["rows"] > 0
    # The long prompt was shortened from the left and kept (counted in the report); the long answer was not
    # cut but dropped.
    rows = [r for split in ("train", "validation") for r in rows_of(data_dir / split)]
    long_prompt = max(rows, key=lambda r: r["prompt_tokens"])
    assert long_prompt["prompt_tokens"] > SEQ_LEN and long_prompt["prompt_cut"] > 0
    assert long_prompt["chosen_tokens"] >= 2 and long_prompt["rejected_tokens"] >= 2  # "yes"/"no" and end of turn
    assert sum(split["prompt_shortened"] for split in splits.values()) == sum(r["prompt_cut"] > 0 for r in rows)
    assert sum(split["response_cut"] for split in splits.values()) == 0
    assert splits["train"]["lengths"]["chosen_tokens"]["min"] >= 2  # an answer and its end of turn
    # The data report shows the length distributions of the prompt and both sides.
    from instune.report.sections import data_sections

    titles = [section.title for section in data_sections(data_dir)]
    assert "data: pair token lengths" in titles and "data: sources" in titles


def test_sides_are_padded_rows_with_response_only_labels(prepared):
    _, data_dir = prepared
    rows = rows_of(data_dir / "train")
    for row in rows:
        for side in ("chosen", "rejected"):
            ids, labels = np.array(row[f"{side}_input_ids"]), np.array(row[f"{side}_labels"])
            assert len(ids) == len(labels) == SEQ_LEN
            labelled = np.flatnonzero(labels != IGNORE_INDEX)
            assert len(labelled) == row[f"{side}_tokens"] and (labels[labelled] == ids[labelled]).all()
            assert labelled[-1] - labelled[0] + 1 == len(labelled)  # one span: the response


def direct_logps(model, ids: np.ndarray, labels: np.ndarray) -> float:
    """log P(response | prompt): one unpadded sequence, token by token from the model's log-softmax."""
    real = int(np.flatnonzero(labels != IGNORE_INDEX)[-1]) + 1
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor(ids[None, :real])).logits[0].double(), -1)
    return sum(float(logprobs[t - 1, ids[t]]) for t in range(1, real) if labels[t] != IGNORE_INDEX)


def test_precomputed_reference_logprobs_equal_a_direct_computation(prepared, model_dir):
    _, data_dir = prepared
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = rows_of(data_dir / "train") + rows_of(data_dir / "validation")
    assert len(rows) == 15
    for row in rows:
        for side in ("chosen", "rejected"):
            expected = direct_logps(model, np.array(row[f"{side}_input_ids"]), np.array(row[f"{side}_labels"]))
            assert row[f"ref_{side}_logps"] == pytest.approx(expected, abs=1e-4), (row["id"], side)
    # The right answer and the wrong one differ, so the values are not one constant.
    assert len({round(r["ref_chosen_logps"], 4) for r in rows}) > 5


def test_held_out_pairs_scored_by_the_reference_itself_have_zero_rewards(prepared, model_dir):
    from instune.eval.preference_eval import score_pairs

    _, data_dir = prepared
    scores = score_pairs(model_dir, data_dir / "validation", beta=0.5)
    rows = rows_of(data_dir / "validation")
    assert scores["pairs"] == len(rows) > 0
    # The model is the reference: every DPO reward is 0, so none is higher, and the log-prob margin is the
    # reference's own.
    assert scores["reward_accuracy"] == 0.0 and scores["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    expected = np.mean([r["ref_chosen_logps"] - r["ref_rejected_logps"] for r in rows])
    assert scores["logp_margin"] == pytest.approx(expected, abs=1e-4)
    accuracy = np.mean([r["ref_chosen_logps"] > r["ref_rejected_logps"] for r in rows])
    assert scores["preference_accuracy"] == pytest.approx(accuracy)


def test_the_before_after_report_sections_hold_a_table_and_a_plot():
    from instune.eval.preference_eval import report_sections, summary_line

    scores = {"before": {"pairs": 4, "preference_accuracy": 0.5, "logp_margin": 0.1, "reward_accuracy": 0.0,
                         "reward_margin": 0.0},
              "after": {"pairs": 4, "preference_accuracy": 0.75, "logp_margin": 0.4, "reward_accuracy": 0.75,
                        "reward_margin": 0.3}}
    table, image = report_sections(scores)
    assert table.rows[0] == ["preference_accuracy", 0.5, 0.75] and len(table.rows) == 4
    assert image.source[:8] == b"\x89PNG\r\n\x1a\n"
    assert "preference accuracy 0.500 -> 0.750" in summary_line(scores)


def test_the_reference_is_loaded_in_model_dtype_not_the_checkpoints(model_dir):
    # The loop's policy computes in model.dtype; the precomputed reference must too, whatever dtype the
    # checkpoint was saved in (transformers' default "auto" would take the checkpoint's).
    import torch

    from instune.data.reference_logprobs import ReferenceLogprobs

    assert ReferenceLogprobs(model_dir, 0, 4, 1024).model.dtype == torch.float32  # saved in float32
    assert ReferenceLogprobs(model_dir, 0, 4, 1024, dtype="bfloat16").model.dtype == torch.bfloat16


def test_training_refuses_data_prepared_for_another_objective_in_one_line(prepared, model_dir):
    from instune.errors import UserError
    from instune.stages import check_prepared_for_objective

    manifest, data_dir = prepared

    def config(**train_and_dpo):
        return validate_config({"name": "p", "output_dir": "/tmp/p", "model": {"path": model_dir},
                                "data": {"sources": [{"name": "math", "path": "x.jsonl"}]}, **train_and_dpo})

    check_prepared_for_objective(config(train={"objective": "dpo"}), manifest, data_dir)
    check_prepared_for_objective(config(train={"objective": "simpo"}), manifest, data_dir)
    with pytest.raises(UserError, match=r"^train.objective: sft, but .* holds preference pairs \(prepared for simpo\)"):
        check_prepared_for_objective(config(), manifest, data_dir)
    with pytest.raises(UserError, match=r"^train.objective: dpo, but .* holds conversations"):
        check_prepared_for_objective(config(train={"objective": "dpo"}), {"splits": {}}, data_dir)
    without_reference = dict(manifest, reference="adapter_disabled")
    check_prepared_for_objective(config(train={"objective": "dpo"}, dpo={"reference": "adapter_disabled"}),
                                 without_reference, data_dir)
    with pytest.raises(UserError, match=r"^dpo.reference: precompute, but the pairs in .* have no reference"):
        check_prepared_for_objective(config(train={"objective": "ipo"}), without_reference, data_dir)
