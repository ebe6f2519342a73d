"""Negative-aware training at inference: eval prompts of a run trained with outcome markers carry the success
marker by default, and the report shows the with/without ablation."""

import json

import pytest
import yaml
from transformers import AutoTokenizer

from instune import stages
from instune.config import load_config
from instune.errors import UserError
from instune.eval.evaluate import SetResult, split_prompt
from instune.eval.outcome_marker import ablation_rows, marker_sections

SUCCESS = "The following response succeeds."


def write_config(tmp_path, markers: bool) -> str:
    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
               for q, a in [("What is 2 + 3?", "5"), ("Convert 2 km to m.", "2000 m")]]
    (tmp_path / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {"name": "nat", "output_dir": str(tmp_path / "out"),
              "data": {"sources": [{"name": "s", "path": str(tmp_path / "set.jsonl")}]},
              "eval": {"sets": [{"name": "qa", "domain": "d", "kind": "in_domain", "path": str(tmp_path / "set.jsonl")}]}}
    if markers:
        config["data"]["outcome_markers"] = {"position": "system"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return str(tmp_path / "config.yaml")


def test_eval_prompts_of_a_nat_run_carry_the_success_marker(tmp_path, tiny_model_dir):
    config = load_config(write_config(tmp_path, markers=True))
    sets, markers = stages.prompt_sets(config)
    assert markers is not None and markers.success == SUCCESS
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    for original, marked in zip(stages.load_eval_sets(config)[0].records, sets[0].records):
        prompt, answer = split_prompt(marked["messages"])
        assert prompt[0] == {"role": "system", "content": SUCCESS}
        assert prompt[1:] == split_prompt(original["messages"])[0]
        assert answer == split_prompt(original["messages"])[1]  # the reference answer is untouched
        rendered = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        assert rendered.count(SUCCESS) == 1
    # The ablation and eval.outcome_marker: none ask without it; a run without markers never adds one.
    unmarked, none = stages.prompt_sets(config, with_marker=False)
    assert none is None and unmarked[0].records == stages.load_eval_sets(config)[0].records
    assert stages.prompt_sets(load_config(write_config(tmp_path, True), ["eval.outcome_marker=none"]))[1] is None
    assert stages.prompt_sets(load_config(write_config(tmp_path, markers=False)))[1] is None


def test_success_marker_without_training_markers_is_refused_at_load(tmp_path):
    with pytest.raises(UserError, match="eval.outcome_marker: success needs data.outcome_markers"):
        load_config(write_config(tmp_path, markers=False), ["eval.outcome_marker=success"])


def result(name: str, kind: str, exact_match: float, loss: float) -> SetResult:
    return SetResult(name, name, kind, 10, loss, 1.0, exact_match, 0.5, 0.0, 50.0)


def test_report_says_which_marker_and_shows_the_ablation(tmp_path):
    config = load_config(write_config(tmp_path, markers=True))
    with_marker = [result("a", "in_domain", 0.6, 1.0), result("b", "out_of_domain", 0.3, 2.0)]
    without = [result("a", "in_domain", 0.4, 1.5), result("b", "out_of_domain", 0.2, 2.5)]
    columns, rows = ablation_rows(with_marker, without)
    assert columns == ["metric", "figure", "with success marker", "without marker", "difference"]
    by_figure = {(r[0], r[1]): r[2:] for r in rows}
    assert by_figure[("exact match", "generalisation")] == pytest.approx([0.45, 0.3, 0.15])
    assert by_figure[("exact match", "in-domain")] == pytest.approx([0.6, 0.4, 0.2])
    assert by_figure[("loss", "generalisation")] == pytest.approx([1.5, 2.0, -0.5])
    note, table = stages.marker_report_sections(config, with_marker, without)
    assert f'success marker "{SUCCESS}" (system)' in note.body
    assert table.title == "outcome-marker ablation (tuned model)" and table.rows == rows
    # Without training markers: a note saying so, no ablation.
    plain = load_config(write_config(tmp_path, markers=False))
    assert [s.body for s in stages.marker_report_sections(plain)] == \
        ["Eval prompts carry no outcome marker (training used none)."]
    assert len(marker_sections(None, True)) == 1
