import json
import math

from instune.eval.evaluate import SetResult
from instune.report.document import Code, Image, Table, Text
from instune.report.figures import learning_curves_png
from instune.report.sections import (data_sections, eval_sections, read_metrics, run_sections, sweep_sections,
                                     training_sections)


def results(exact_match: float):
    return [SetResult("arith", "arith", "in_domain", 4, 1.0, math.e, exact_match, 0.5, 1.0, 20.0),
            SetResult("units", "units", "out_of_domain", 4, 2.0, math.e ** 2, 0.0, 0.1, 0.0, 5.0)]


def write_data_dir(root):
    data = root / "data"
    (data / "report").mkdir(parents=True)
    (data / "manifest.json").write_text(json.dumps({
        "sources": {"alpaca": {"read": 10, "kept": 8, "rejected": 2, "rejects": [{"reason": "x"}],
                               "dropped_at_tokenization": 1},
                    "sharegpt": {"read": 5, "kept": 5, "rejected": 0, "rejects": []}},
        "splits": {"train": {"examples": 13, "rows": 4}},
        "mixture": {"weights": {"alpaca": 0.5, "sharegpt": 0.5}}}))
    png = learning_curves_png([{"step": 1, "loss": 1.0, "lr": 0.1}])
    for name in ["lengths.png", "a_sources.png"]:
        (data / "report" / name).write_bytes(png)
    (data / "report" / "notes.txt").write_text("not an image")
    return data


def test_data_sections_read_the_manifest_and_every_png(tmp_path):
    sections = data_sections(write_data_dir(tmp_path))
    sources, splits, mixture, *images = sections
    # Nested "rejects" left out; a record dropped at tokenization counts as rejected, not kept.
    assert sources.columns == ["source", "read", "kept", "rejected", "of which at tokenization", "kept %"]
    assert sources.rows == [["alpaca", 10, 7, 3, 1, 70.0], ["sharegpt", 5, 5, 0, 0, 100.0]]
    assert splits.rows == [["train", 13, 4]] and mixture.rows == [["alpaca", 0.5], ["sharegpt", 0.5]]
    assert [i.title for i in images] == ["data: a sources", "data: lengths"]
    assert data_sections(tmp_path / "nothing_here") == []


def test_training_sections_plot_metrics_in_step_order(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps({"step": s, "loss": 1.0 / s, "lr": 0.1}) for s in [20, 10, 30]) + "\n")
    assert [r["step"] for r in read_metrics(metrics)] == [10, 20, 30]
    image, last = training_sections(metrics)
    assert isinstance(image, Image) and last.title == "training: last logged step (30)"
    assert ["loss", 1.0 / 30] in last.rows
    assert training_sections(tmp_path / "missing.jsonl") == []


def test_eval_sections_before_and_after():
    text, summary, per_set, bars, gap = eval_sections(results(0.25), results(0.75))
    assert "base: exact match 12.5% over all domains, gap 25.0%" in text.body
    assert "tuned: 37.5%, gap 75.0% (change 25.0%)" in text.body
    em_gap = next(r for r in summary.rows if r[0] == "exact match" and r[1].startswith("gap"))
    assert em_gap[2:] == [0.25, 0.75, 0.5]
    assert per_set.rows[0][:6] == ["arith", "arith", "in_domain", 4, 0.25, 0.75]
    assert isinstance(bars, Image) and isinstance(gap, Image)
    assert eval_sections([]) == []


def test_sweep_sections_best_first_with_unscored_trials_last():
    trials = [{"trial": "t1", "lr": 1e-4, "r": 8, "score": 0.3}, {"trial": "t2", "lr": 1e-3, "r": 16, "score": 0.6},
              {"trial": "t3", "lr": 1e-2, "r": 8, "status": "ERROR"}, {"trial": "t4", "lr": 3e-4, "r": 4, "score": 0.1}]
    text, table, plot = sweep_sections(trials, ["lr", "r"], "score", mode="max")
    assert "Best (max score): lr=0.001, r=16 -> score 0.6" in text.body
    assert table.columns == ["trial", "lr", "r", "score", "status"]
    assert [row[0] for row in table.rows] == ["t2", "t1", "t4", "t3"]
    assert isinstance(plot, Image)
    _, table_min, _ = sweep_sections(trials, ["lr"], "score", mode="min")
    assert [row[0] for row in table_min.rows] == ["t4", "t1", "t2", "t3"]
    assert isinstance(sweep_sections([], ["lr"], "score")[0], Text)


def test_run_sections_include_what_exists(tmp_path):
    data = write_data_dir(tmp_path)
    sections = run_sections("name: demo\n", data_dir=data, metrics_file=tmp_path / "absent.jsonl",
                            before=results(0.0), after=results(0.5))
    kinds = [type(s).__name__ for s in sections]
    assert kinds == ["Text", "Table", "Table", "Image", "Image", "Table", "Table", "Table", "Image", "Image", "Code"]
    assert isinstance(sections[-1], Code) and sections[-1].body == "name: demo\n"
    assert [type(s) for s in run_sections("x: 1\n")] == [Code]
    assert all(isinstance(s, (Text, Table, Image, Code)) for s in sections)
