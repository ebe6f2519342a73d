import csv
import io

import pytest
import yaml

from instune.config import load_config, validate_config
from instune.tune.plots import plot_learning_curves, plot_mix, plot_objective_vs_params
from instune.tune.results import (best_config_tree, csv_text, ranked_table, sort_rows, table_columns,
                                   write_best_config)
from instune.tune.trial import TrialPlan

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rows():
    return [
        {"trial": "t1", "status": "finished", "objective": 2.0, "steps": 20, "train.lr": 1e-3, "mix/a": 0.5,
         "in_domain_loss": 2.0, "out_of_domain_loss": 3.0, "eval_loss/x": 2.0, "error": "",
         "overrides": {"train.lr": 1e-3}},
        {"trial": "t2", "status": "failed", "objective": None, "steps": None, "train.lr": 5.0, "mix/a": None,
         "error": "UserError: peft.dropout: Input should be less than 1", "overrides": None},
        {"trial": "t3", "status": "stopped", "objective": 3.5, "steps": 10, "train.lr": 1e-5, "mix/a": 0.0,
         "in_domain_loss": 3.5, "out_of_domain_loss": 3.1, "eval_loss/x": 3.5, "error": "",
         "overrides": {"train.lr": 1e-5}},
        {"trial": "t4", "status": "finished", "objective": 1.5, "steps": 20, "train.lr": 3e-3, "mix/a": 1.0,
         "in_domain_loss": 1.5, "out_of_domain_loss": 3.3, "eval_loss/x": 1.5, "error": "",
         "overrides": {"train.lr": 3e-3}},
    ]


def plan(tmp_path, **changes) -> TrialPlan:
    fields = dict(base_tree={}, sweep_dir=str(tmp_path), model_path="m", tokenizer_path="m",
                  filtered_dir=str(tmp_path / "filtered"), kept={}, mix_by="source", mix_names=["a"],
                  dirichlet_alpha=None, eval_data={}, set_kinds={"x": "in_domain"}, objective="in_domain_loss",
                  report_while_training=True)
    return TrialPlan(**(fields | changes))


def base_tree(tmp_path) -> dict:
    return validate_config({"name": "exp", "output_dir": str(tmp_path / "out"),
                            "data": {"sources": [{"name": "a", "path": "a.jsonl"}, {"name": "b", "path": "b.jsonl"}]},
                            "sweep": {"params": {"train.lr": {"choice": [1e-3, 3e-3]}}}}).model_dump(mode="json")


def test_rows_sort_by_objective_with_failed_trials_last():
    assert [r["trial"] for r in sort_rows(rows(), "in_domain_loss")] == ["t4", "t1", "t3", "t2"]
    assert [r["trial"] for r in sort_rows(rows(), "in_domain_accuracy")] == ["t3", "t1", "t4", "t2"]


def test_tables_hold_every_trial_and_only_filled_columns():
    ordered = sort_rows(rows(), "in_domain_loss")
    columns = table_columns(ordered, ["train.lr"], ["a"], per_set=False)
    assert columns == ["trial", "status", "objective", "steps", "train.lr", "mix/a", "in_domain_loss",
                       "out_of_domain_loss", "error"]
    md = ranked_table(ordered, columns).splitlines()
    assert len(md) == 2 + 4
    assert md[2].startswith("| 1 | t4 | finished | 1.5 | 20 | 0.003 | 1 |")
    assert "UserError: peft.dropout" in md[5]
    parsed = list(csv.DictReader(io.StringIO(csv_text(ordered, table_columns(ordered, ["train.lr"], ["a"],
                                                                                   per_set=True)))))
    assert [r["trial"] for r in parsed] == ["t4", "t1", "t3", "t2"]
    assert parsed[0]["eval_loss/x"] == "1.5" and parsed[3]["objective"] == ""


def test_best_config_is_a_runnable_config_with_the_best_values(tmp_path):
    tree = base_tree(tmp_path)
    ordered = sort_rows(rows(), "in_domain_loss")
    path = write_best_config(tree, ordered, plan(tmp_path), tmp_path)
    assert path.read_text().startswith("# Best trial t4 (finished) of sweep exp: in_domain_loss = 1.5.")
    best = load_config(path)
    assert best.train.lr == 3e-3
    assert best.sweep is None
    assert best.name == "exp-best" and best.output_dir == str(tmp_path / "out" / "best")


def test_best_domain_mix_becomes_per_domain_sources(tmp_path, filtered):
    best = {"overrides": {"train.lr": 1e-3}, "mix/arithmetic": 0.75, "mix/string_edit": 0.25, "mix/list_ops": 0.0}
    config = validate_config(best_config_tree(base_tree(tmp_path), best,
                                              plan(tmp_path, mix_by="domain",
                                                   mix_names=["arithmetic", "string_edit", "list_ops"]),
                                              tmp_path))
    assert [(s.name, s.domain, s.format, s.weight) for s in config.data.sources] == \
        [("arithmetic", "arithmetic", "openai", 0.75), ("string_edit", "string_edit", "openai", 0.25)]
    assert len((tmp_path / "best_sources" / "arithmetic.jsonl").read_text().splitlines()) == 3


def test_no_best_config_when_every_trial_failed(tmp_path):
    assert write_best_config(base_tree(tmp_path), [rows()[1]], plan(tmp_path), tmp_path) is None


def test_plots_are_png_files(tmp_path):
    ordered = sort_rows(rows(), "in_domain_loss")
    (tmp_path / "p").mkdir()
    curves = {"t1": [{"step": 5, "loss": 3.0, "in_domain_loss": 3.2}, {"step": 10, "loss": 2.0, "in_domain_loss": 2.5}],
              "t4": [{"step": 5, "loss": 2.5}]}
    paths = [plot_objective_vs_params(ordered, ["train.lr", "mix/a"], "in_domain_loss", tmp_path / "p" / "obj.png"),
             plot_learning_curves(curves, tmp_path / "p" / "curves.png"),
             plot_mix(ordered, ["a"], "loss", tmp_path / "p" / "mix.png")]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["curves.png", "mix.png", "obj.png"]


@pytest.mark.parametrize("plot", ["objective", "curves", "mix"])
def test_plots_without_data_are_skipped(tmp_path, plot):
    failed = [rows()[1]]
    path = tmp_path / "x.png"
    result = {"objective": lambda: plot_objective_vs_params(failed, ["train.lr"], "in_domain_loss", path),
              "curves": lambda: plot_learning_curves({}, path),
              "mix": lambda: plot_mix(failed, ["a"], "loss", path)}[plot]()
    assert result is None and not path.exists()


def test_best_config_yaml_round_trips_the_resolved_tree(tmp_path):
    tree = base_tree(tmp_path)
    path = write_best_config(tree, sort_rows(rows(), "in_domain_loss"), plan(tmp_path), tmp_path)
    written = yaml.safe_load(path.read_text())
    assert written["data"]["sources"] == tree["data"]["sources"]
    assert written["train"] | {"lr": tree["train"]["lr"]} == tree["train"]


def test_trial_id_is_read_past_the_suffix_tune_adds_to_an_existing_directory():
    """A trial that had started before a killed sweep was resumed runs again in "<id>_<4 hex>"; its files are
    still under trials/<id>, where the trial itself wrote them."""
    from ray.tune import Result

    from instune.tune.results import trial_id_of

    def result(path, metrics=None):
        return Result(metrics=metrics, checkpoint=None, error=None, path=path)

    assert trial_id_of(result("/out/sweep/tune/44d46_00002_e19a")) == "44d46_00002"
    assert trial_id_of(result("/out/sweep/tune/44d46_00002")) == "44d46_00002"
    assert trial_id_of(result("/out/sweep/tune/44d46_00002_e19a", {"trial_id": "44d46_00002"})) == "44d46_00002"
