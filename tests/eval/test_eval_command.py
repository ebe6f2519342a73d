"""`instune eval` end to end: config -> Ray actor pool -> eval/*.json, predictions and the HTML report."""

import json

import pytest
import yaml

from instune import cli

QA = [("What is 2 + 3?", "5"), ("What is 7 + 1?", "8"), ("Convert 2 km to m.", "2000 m")]


def write_config(tmp_path, model_dir) -> str:
    for name, pairs in [("arith", QA[:2]), ("units", QA[2:])]:
        lines = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                 for q, a in pairs]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    config = {
        "name": "tiny_eval", "output_dir": str(tmp_path / "out"),
        "model": {"path": str(model_dir), "max_length": 64},
        "data": {"sources": [{"name": "unused", "path": str(tmp_path / "arith.jsonl")}]},
        "scaling": {"num_workers": 1},
        "eval": {"max_new_tokens": 4, "batch_size": 2, "sets": [
            {"name": "arith", "domain": "arithmetic", "kind": "in_domain", "path": str(tmp_path / "arith.jsonl")},
            {"name": "units", "domain": "units", "kind": "out_of_domain", "path": str(tmp_path / "units.jsonl")}]},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.slow
def test_eval_command_writes_results_and_report(ray_cluster, tmp_path, tiny_model_dir, tiny_adapter_and_merged):
    adapter_dir, _ = tiny_adapter_and_merged
    config = write_config(tmp_path, tiny_model_dir)
    eval_dir = tmp_path / "out" / "eval"

    assert cli.main(["eval", config, "--model", str(tiny_model_dir)]) == 0
    base = json.loads((eval_dir / "eval.json").read_text())
    assert [(r["name"], r["kind"], r["examples"]) for r in base] == [("arith", "in_domain", 2),
                                                                      ("units", "out_of_domain", 1)]
    predictions = [json.loads(line) for line in (eval_dir / "eval_predictions.jsonl").read_text().splitlines()]
    assert [(p["set"], p["reference"]) for p in predictions] == [("arith", "5"), ("arith", "8"), ("units", "2000 m")]
    html = (eval_dir / "report.html").read_text()
    assert html.count('<img alt=') == 2 and "data:image/png;base64," in html
    assert "evaluation: model" in html

    # With the base results of a run beside it, the adapter's report compares before and after.
    (eval_dir / "base.json").write_text(json.dumps(base))
    assert cli.main(["eval", config, "--model", str(adapter_dir)]) == 0
    tuned = json.loads((eval_dir / "eval.json").read_text())
    assert all(abs(t["loss"] - b["loss"]) > 1e-3 for t, b in zip(tuned, base))
    markdown = (eval_dir / "report.md").read_text()
    assert "## evaluation: base vs model" in markdown
    assert "| exact match before | exact match after |" in markdown
    assert (eval_dir / "report_images" / "figure_01.png").is_file()


def test_eval_command_without_eval_sets_is_a_user_error(tmp_path, tiny_model_dir, capsys):
    config = write_config(tmp_path, tiny_model_dir)
    assert cli.main(["eval", config, "--set", "eval.sets=[]", "--model", str(tiny_model_dir)]) == 2
    assert "eval.sets: no eval sets configured" in capsys.readouterr().err


def test_eval_command_rejects_a_missing_model(tmp_path, tiny_model_dir, capsys):
    config = write_config(tmp_path, tiny_model_dir)
    assert cli.main(["eval", config, "--model", str(tmp_path / "nope")]) == 2
    assert "--model:" in capsys.readouterr().err
