"""The sweep driver: its checks, and end to end on the embedded corpus with a micro model (real Ray, real
Tune trials, real files; marked slow).

The data is prepared once for the module; each sweep copies it into its own output_dir, where sweep_stage
finds it current and reuses it (the corpus lives outside output_dir so the data configs match).
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from instune import stages
from instune.config import ScalingConfig, load_config, validate_config
from instune.errors import UserError
from instune.ray_runtime import cpus_for
from instune.tune.sweep import check_same_sweep, check_sweep, is_prepared_for, max_concurrent_trials
from instune.tune.trial import FINAL_FILE, TRIAL_FILE

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 20
LOG_EVERY = 5


def experiment(output_dir: Path, corpus_dir: Path, sweep: dict | None = None, **train) -> dict:
    """Two in-domain domains and one out-of-domain one; a 2-layer, hidden-64 model; one worker per trial."""
    sets = [("arithmetic", "in_domain"), ("string_edit", "in_domain"), ("unit_conversion", "out_of_domain")]
    tree = {
        "name": "sweep_test",
        "output_dir": str(output_dir),
        "model": {"max_length": 64,
                  "embedded": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128}},
        "data": {
            "corpus": {"dir": str(corpus_dir), "in_domain": ["arithmetic", "string_edit"],
                       "out_of_domain": ["unit_conversion"], "train_per_domain": 150, "eval_per_domain": 12},
            "sources": [{"name": "tasks_alpaca", "path": f"{corpus_dir}/train/alpaca.jsonl", "format": "alpaca"},
                        {"name": "tasks_sharegpt", "path": f"{corpus_dir}/train/sharegpt.jsonl",
                         "format": "sharegpt"}],
            "mix_size": 300,
        },
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0,
                 "modules_to_save": ["embed_tokens", "lm_head"]},
        "train": {"lr": 3e-3, "max_steps": MAX_STEPS, "micro_batch_size": 8, "log_every": LOG_EVERY} | train,
        "scaling": {"num_workers": 1},
        "eval": {"max_examples": 8, "max_new_tokens": 8,
                 "sets": [{"name": n, "domain": n, "kind": k, "path": f"{corpus_dir}/eval/{n}.jsonl"}
                          for n, k in sets]},
    }
    if sweep is not None:
        tree["sweep"] = sweep
    return tree


def validated(tree: dict):
    return validate_config(tree, "sweep.yaml")


def test_concurrency_is_what_the_cluster_places_unless_configured():
    two_workers = ScalingConfig(num_workers=2, cpus_per_worker=1.5)
    # Each trial: 2 x 1.5 CPUs of workers plus one for its data pipeline and eval.
    assert max_concurrent_trials(two_workers, {"CPU": 16.0}, None) == 4
    assert max_concurrent_trials(two_workers, {"CPU": 3.0}, None) == 1
    assert max_concurrent_trials(two_workers, {"CPU": 16.0}, 7) == 7
    gpus = ScalingConfig(num_workers=2, use_gpu=True, gpus_per_worker=1)
    assert max_concurrent_trials(gpus, {"CPU": 64.0, "GPU": 4.0}, None) == 2


def test_sweep_checks_name_the_field_before_ray_starts(tmp_path):
    sweep = {"params": {"train.lr": {"choice": [1e-3]}}}
    tree = experiment(tmp_path, tmp_path / "corpus", sweep)
    check_sweep(validated(tree), validated(tree).model_dump(mode="json"))
    with pytest.raises(UserError, match="sweep: the config has no sweep section"):
        config = validated(experiment(tmp_path, tmp_path / "corpus"))
        check_sweep(config, config.model_dump(mode="json"))
    no_ood = dict(tree, sweep=dict(sweep, objective="gap_loss"))
    no_ood["eval"] = dict(tree["eval"], sets=tree["eval"]["sets"][:2])
    with pytest.raises(UserError, match="sweep.objective: gap_loss needs an eval set of kind out_of_domain"):
        check_sweep(validated(no_ood), validated(no_ood).model_dump(mode="json"))
    missing = dict(tree, sweep={"mix": {"by": "source", "weights": {"tasks_alpaca": 1.0}}})
    with pytest.raises(UserError, match="give every source a weight .* missing: tasks_sharegpt"):
        check_sweep(validated(missing), validated(missing).model_dump(mode="json"))
    unknown = dict(tree, sweep={"mix": {"weights": {"tasks_alpaca": 1.0, "tasks_sharegpt": 1.0, "web": 1.0}}})
    with pytest.raises(UserError, match="sweep.mix: no source named web"):
        check_sweep(validated(unknown), validated(unknown).model_dump(mode="json"))
    # Preference sweeps: tests/tune/test_sweep_pairs.py.
    swept = dict(tree, sweep={"params": {"train.objective": {"choice": ["sft", "dpo"]}}})
    with pytest.raises(UserError, match="train.objective: sft trains on conversations and dpo on preference"):
        check_sweep(validated(swept), validated(swept).model_dump(mode="json"))


def test_a_trial_validates_its_config_away_from_a_relative_chat_template(tmp_path, monkeypatch):
    # Tune runs each trial in its own directory (RAY_CHDIR_TO_TRIAL_DIR), perhaps on another node; the
    # template is already in the trial's tokenizer, so the trial does not look for the file again.
    from instune.data.chat_template import read_template
    from instune.tune.trial import TrialPlan, trial_config

    (tmp_path / "mine.jinja").write_text(read_template("chatml"))
    monkeypatch.chdir(tmp_path)
    tree = experiment(tmp_path, tmp_path / "corpus", {"params": {"train.lr": {"choice": [1e-3]}}})
    tree["model"] = {"chat_template": "mine.jinja"}
    config = validated(tree)
    check_sweep(config, config.model_dump(mode="json"))
    swept = dict(tree, sweep={"params": {"model.chat_template": {"choice": ["chatml", "llama3"]}}})
    with pytest.raises(UserError, match="sweep.params.model.chat_template: model.chat_template is fixed"):
        check_sweep(validated(swept), validated(swept).model_dump(mode="json"))
    plan = TrialPlan(base_tree=config.model_dump(mode="json"), sweep_dir=str(tmp_path), model_path="m",
                     tokenizer_path="t", filtered_dir=str(tmp_path), kept={}, mix_by=None, mix_names=[],
                     dirichlet_alpha=None, eval_data={}, set_kinds={}, objective="in_domain_loss",
                     report_while_training=True)
    monkeypatch.chdir(tmp_path.parent)  # as the trial's own directory is
    trial, _, _ = trial_config({"train.lr": 2e-3}, plan)
    assert trial.train.lr == 2e-3 and trial.model.chat_template is None


def test_a_sweep_directory_belongs_to_one_config(tmp_path):
    (tmp_path / "sweep_config.yaml").write_text("name: a\n")
    check_same_sweep(tmp_path, "name: a\n")
    check_same_sweep(tmp_path / "new", "name: b\n")
    with pytest.raises(UserError, match="holds a sweep of a different config"):
        check_same_sweep(tmp_path, "name: b\n")


def test_prepared_data_is_reused_only_for_the_same_data_and_model_settings(tmp_path):
    config = validated(experiment(tmp_path, tmp_path / "corpus", {"params": {"train.lr": {"choice": [1e-3]}}}))
    manifest = {"config": validated(experiment(tmp_path, tmp_path / "corpus")).model_dump(mode="json")}
    assert is_prepared_for(manifest, config)
    manifest["config"]["data"]["mix_size"] = 200
    assert not is_prepared_for(manifest, config)


def write_config(tree: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ray_cluster):
    """(corpus dir, an output dir holding data/ and base_model/ prepared for `experiment`)."""
    root = tmp_path_factory.mktemp("sweep")
    corpus_dir, output_dir = root / "corpus", root / "prepared"
    stages.prepare_stage(load_config(write_config(experiment(output_dir, corpus_dir), root / "prepare.yaml")))
    return corpus_dir, output_dir


def output_dir_with_data(prepared, output_dir: Path) -> Path:
    _, source = prepared
    for name in ("data", "base_model"):
        shutil.copytree(source / name, output_dir / name)
    return output_dir


def read_rows(sweep_dir: Path) -> list[dict]:
    import csv

    with open(sweep_dir / "results.csv") as f:
        return list(csv.DictReader(f))


def curves(sweep_dir: Path, trial: str) -> dict[int, dict]:
    lines = (sweep_dir / "trials" / trial / "train" / "run" / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m for m in map(json.loads, lines)}


@contextlib.contextmanager
def stale_cluster_file():
    """(an environment whose Ray current-cluster file, under a RAY_TMPDIR of its own, names a dead port as a
    crashed `ray start` cluster leaves it, that address)."""
    from instune.ray_runtime import unused_port

    # Short: Ray's socket paths under it must stay under 108 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    (temp_dir / "ray").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(temp_dir))
    recorded = f"127.0.0.1:{unused_port()}"
    (temp_dir / "ray" / "ray_current_cluster").write_text(recorded)
    try:
        yield env, recorded
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_domain_mix_sweep_with_asha_beside_a_stale_cluster_file(prepared, tmp_path):
    """ASHA stops the worse mix at its first rung, the results rank and plot both trials, and the best config
    trains the winning mix. Run as `instune sweep` on a machine whose Ray current-cluster file names a dead
    port (issue 20 (a)): the stopped trial's CPU is freed by its own cluster's placement-group cleaner,
    whatever that file names, so the sweep finishes and leaves every CPU free."""
    corpus_dir, _ = prepared
    output_dir = output_dir_with_data(prepared, tmp_path / "out")
    # Two trials, one after the other: string_edit weighted like arithmetic, then left out. Scored in-domain
    # on string_edit alone, the second trails the first at ASHA's first rung, so ASHA stops it. (Averaged
    # with arithmetic, where the second gains what it loses on string_edit, the two would be a coin toss.)
    sweep = {"search": "grid", "scheduler": "asha", "objective": "in_domain_loss", "max_concurrent_trials": 1,
             "grace_steps": 2 * LOG_EVERY,
             "mix": {"by": "domain", "weights": {"arithmetic": 1.0, "string_edit": {"choice": [1.0, 0.0]}}}}
    tree = experiment(output_dir, corpus_dir, sweep)
    tree["eval"]["sets"] = [s for s in tree["eval"]["sets"] if s["name"] != "arithmetic"]
    tree["scaling"]["resource_wait_s"] = 120  # a leaked CPU ends the sweep within minutes, not the test's limit
    config_path = write_config(tree, tmp_path / "sweep.yaml")
    with stale_cluster_file() as (env, recorded):
        result = subprocess.run([sys.executable, str(REPO / "tests/tune/sweep_then_free_cpus.py"),
                                 str(config_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("[ray] ignoring ") and f"it names {recorded}, where no Ray cluster answers" in line
               for line in lines), lines
    sweep_dir = output_dir / "sweep"

    rows = {float(r["mix/string_edit"]): r for r in read_rows(sweep_dir)}
    assert sorted(rows) == [0.0, 0.5], [r["error"] for r in rows.values()]
    with_, without = rows[0.5], rows[0.0]
    assert (with_["status"], int(with_["steps"])) == ("finished", MAX_STEPS)

    # ASHA stopped the trial without string_edit at its first rung: fewer steps in all than the full grid.
    assert (without["status"], int(without["steps"])) == ("stopped", 2 * LOG_EVERY)
    assert int(with_["steps"]) + int(without["steps"]) < len(rows) * MAX_STEPS

    # The stopped trial's Train run gave its CPU back; a reserved one would starve every later trial.
    cpus = cpus_for(validated(tree).scaling)
    assert lines[-1] == f"free CPUs: {cpus:g} of {cpus:g}"

    # The mix matters: at the same step, the model that never saw string_edit is worse on it.
    curve_with, curve_without = curves(sweep_dir, with_["trial"]), curves(sweep_dir, without["trial"])
    step = 2 * LOG_EVERY
    assert curve_without[step]["eval_loss/string_edit"] > curve_with[step]["eval_loss/string_edit"] + 0.05
    assert json.loads((sweep_dir / "trials" / with_["trial"] / TRIAL_FILE).read_text())["mix"] == \
        {"arithmetic": 0.5, "string_edit": 0.5}

    # The table is sorted by the objective; the finished trial carries exact match per eval set.
    ranked = read_rows(sweep_dir)
    assert [r["trial"] for r in ranked] == [with_["trial"], without["trial"]]
    assert float(ranked[0]["objective"]) < float(ranked[1]["objective"])
    assert all(0.0 <= float(with_[f"accuracy/{name}"]) <= 1.0 for name in ("string_edit", "unit_conversion"))
    assert with_["in_domain_accuracy"] != "" and without["in_domain_accuracy"] == ""

    # The best config trains the winning mix as a plain run: one source per domain with its weight.
    assert f"[sweep] best config: {sweep_dir / 'best_config.yaml'}" in lines
    best = load_config(sweep_dir / "best_config.yaml")
    assert best.sweep is None and best.name == "sweep_test-best"
    assert [(s.name, s.format, s.weight) for s in best.data.sources] == \
        [("arithmetic", "openai", 0.5), ("string_edit", "openai", 0.5)]
    assert "| rank | trial | status | objective |" in (sweep_dir / "results.md").read_text()
    plots = sorted((sweep_dir / "plots").iterdir())
    assert [p.name for p in plots] == ["learning_curves.png", "mix_vs_domains.png", "objective_vs_params.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in plots)


def wait_for(predicate, timeout: float, what: str, process=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the sweep exited ({process.returncode}) before {what}")
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def run_cli(config_path: Path, log: Path) -> subprocess.Popen:
    """`instune sweep` as its own driver process on the test's Ray cluster (it joins through RAY_ADDRESS)."""
    import ray

    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    # Its own session, so SIGKILL to the group ends the driver and nothing else; Ray then ends the driver's
    # trials (their actors belong to its job).
    return subprocess.Popen([sys.executable, "-m", "instune.cli", "sweep", str(config_path)], cwd=REPO, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def terminated_in_saved_state(tune_dir: Path) -> set[str]:
    """Ids of the trials Tune's saved experiment state has as TERMINATED (none while it is being written)."""
    ended = set()
    for path in tune_dir.glob("experiment_state-*.json"):
        try:
            trials = [json.loads(state) for state, _ in json.loads(path.read_text())["trial_data"]]
        except (OSError, ValueError):
            continue
        ended.update(t["trial_id"] for t in trials if t.get("status") == "TERMINATED")
    return ended


@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_finished_trials(prepared, tmp_path):
    corpus_dir, _ = prepared
    output_dir = output_dir_with_data(prepared, tmp_path / "out")
    # Three trials, one at a time: very large head dropout, an invalid rate (a failed trial), none.
    sweep = {"search": "grid", "scheduler": "fifo", "objective": "generalisation_loss", "final_eval": False,
             "max_concurrent_trials": 1, "params": {"train.head_dropout": {"choice": [0.9, 1.5, 0.0]}}}
    config_path = write_config(experiment(output_dir, corpus_dir, sweep, max_steps=LOG_EVERY), tmp_path / "sweep.yaml")
    trials_dir = output_dir / "sweep" / "trials"

    first = run_cli(config_path, tmp_path / "first.log")
    try:
        wait_for(lambda: any(trials_dir.glob(f"*/{FINAL_FILE}")), 900, "the first trial to finish", first)
        # Killed once Tune's saved experiment state (what a resume reads) has that trial ended: Tune saves it
        # within a second or so of a trial ending (TUNE_GLOBAL_CHECKPOINT_S=1).
        [finished] = [p.parent.name for p in trials_dir.glob(f"*/{FINAL_FILE}")]
        wait_for(lambda: finished in terminated_in_saved_state(output_dir / "sweep" / "tune"), 60,
                 "Tune to save the finished trial", first)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    finished_before = {p.parent.name: p.stat().st_mtime_ns for p in trials_dir.glob(f"*/{FINAL_FILE}")}
    assert len(finished_before) == 1, (tmp_path / "first.log").read_text()[-3000:]
    assert not (output_dir / "sweep" / "results.csv").exists()

    second = run_cli(config_path, tmp_path / "second.log")
    try:
        assert second.wait(timeout=1200) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
    log = (tmp_path / "second.log").read_text()
    assert "[sweep] resuming" in log
    # The finished trial was not run again: its final metrics are the same file, untouched.
    assert {t: (trials_dir / t / FINAL_FILE).stat().st_mtime_ns for t in finished_before} == finished_before
    rows = {float(r["train.head_dropout"]): r for r in read_rows(output_dir / "sweep")}
    assert sorted(rows) == [0.0, 0.9, 1.5]
    assert rows[0.0]["status"] == rows[0.9]["status"] == "finished"
    assert int(rows[0.0]["steps"]) == int(rows[0.9]["steps"]) == LOG_EVERY
    assert rows[1.5]["status"] == "failed"
    assert "train.head_dropout: Input should be less than 1" in rows[1.5]["error"]
    assert rows[1.5]["objective"] == ""


@pytest.mark.slow
def test_optuna_search_samples_the_configured_space(ray_cluster, tmp_path):
    from ray import tune

    from instune.config import SweepConfig
    from instune.tune.sweep import make_tuner

    def objective(sampled):
        tune.report({"step": 1, "objective": abs(sampled["train.lr"] - 1e-3), "mix.a": sampled["mix.a"]})

    sweep = SweepConfig(search="optuna", scheduler="fifo", num_samples=4, seed=3,
                        params={"train.lr": {"loguniform": [1e-4, 1e-2]}, "peft.r": {"choice": [8, 16]},
                                "train.max_steps": {"randint": [5, 7]}},
                        mix={"weights": {"a": 1.0, "b": {"uniform": [0.0, 1.0]}}})
    tuner = make_tuner(tune.with_resources(objective, {"memory": 1}), sweep, 5, tmp_path / "tune", concurrency=2)
    results = tuner.fit()
    configs = [r.config for r in results]
    assert len(configs) == 4 and not any(r.error for r in results)
    assert all(1e-4 <= c["train.lr"] <= 1e-2 and c["peft.r"] in (8, 16) and 5 <= c["train.max_steps"] <= 7
               and c["mix.a"] == 1.0 and 0.0 <= c["mix.b"] <= 1.0 for c in configs)
    assert len({c["train.lr"] for c in configs}) == 4
