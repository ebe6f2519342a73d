"""train.report_to: the metrics callback reports every metric at its step to TensorBoard, W&B (offline) and
MLflow (a SQLite store in the run directory), attaches the resolved config and the data report, closes the runs at the last step or
as failed at an exception, and a rerun on the same directory resumes into the same W&B and MLflow runs."""

from __future__ import annotations

import json
import struct

import pytest

from instune.config import validate_config
from instune.errors import UserError
from instune.train.trackers import MLFLOW_ID_FILE, WANDB_ID_FILE, Tracking, data_report_attachments

STEPS = [{"step": 1, "loss": 2.5, "lr": 1e-3, "tokens_per_second": 100.0, "trainable_params": 10},
         {"step": 2, "loss": 2.0, "lr": 5e-4, "tokens_per_second": 120.0, "trainable_params": 10,
          "eval_loss": 2.2, "eval_loss/units": 3.1}]
CONFIG_YAML = "name: exp\ntrain:\n  lr: 0.001\n"
REPORT_MD = "# Data report\n\n| source | kept |\n|---|---|\n| tasks | 12 |\n"


def config_tree(**train):
    return {"name": "exp", "output_dir": "/tmp/exp", "data": {"sources": [{"name": "a", "path": "x"}]},
            "train": train}


@pytest.fixture
def offline_trackers(monkeypatch):
    # The driver's variables travel with the callback; these reach the trackers through Tracking.environment.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return Tracking(report_to=["tensorboard", "wandb", "mlflow"], name="exp",
                    config={"name": "exp", "train": {"lr": 0.001, "report_to": ["wandb"]}},
                    attachments={"resolved_config.yaml": CONFIG_YAML, "data_report.md": REPORT_MD})


def scalars(event_dir) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from TensorBoard event files (TFRecord framing around Event protos)."""
    from tensorboardX.proto.event_pb2 import Event

    found: dict[str, list] = {}
    for path in sorted(event_dir.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    found.setdefault(value.tag, []).append((event.step, round(value.simple_value, 6)))
            offset += 12 + length + 4
    return found


def wandb_history(run_file) -> list[tuple[int, dict]]:
    """(step, {metric: value}) of each history record in an offline run's .wandb file: LevelDB's log format
    (32 KiB blocks of records framed by checksum, length and type) after W&B's 7-byte header."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B"
    offset, pending, history = 7, b"", []
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a header is padding
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        if kind == 0:
            break
        pending += data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                history.append((record.history.step.num, {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                                          for i in record.history.item}))
    return history


def run_callback(run_dir, tracking, reports, fail: bool = False):
    from instune.train.trainer import make_metrics_callback

    run_dir.mkdir(parents=True, exist_ok=True)
    callback = make_metrics_callback(run_dir / "metrics.jsonl", 2, tracking)
    for metrics in reports:
        callback.after_report(None, [metrics], None)
    if fail:
        callback.after_exception(None, {0: RuntimeError("worker died")})


def mlflow_run(run_dir):
    from mlflow import MlflowClient

    from instune.train.trackers import mlflow_tracking_uri

    client = MlflowClient(tracking_uri=mlflow_tracking_uri(run_dir))
    runs = client.search_runs([client.get_experiment_by_name("instune").experiment_id])
    assert len(runs) == 1
    return client, runs[0]


@pytest.mark.slow  # ~20 s, most of it MLflow creating its SQLite store and W&B starting its service
def test_every_metric_reaches_every_tracker_and_a_rerun_after_a_failure_resumes_the_same_runs(offline_trackers,
                                                                                           tmp_path):
    run_dir = tmp_path / "run"
    run_callback(run_dir, offline_trackers, STEPS[:1], fail=True)  # a worker died after step 1
    client, run = mlflow_run(run_dir)
    assert run.info.status == "FAILED"
    mlflow_id, wandb_id = (run_dir / MLFLOW_ID_FILE).read_text(), (run_dir / WANDB_ID_FILE).read_text()

    run_callback(run_dir, offline_trackers, STEPS[1:])  # `instune train` again, on the same output_dir
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    board = scalars(run_dir / "tensorboard")
    assert sorted(board["loss"]) == [(1, 2.5), (2, 2.0)] and board["eval_loss/units"] == [(2, 3.1)]

    client, run = mlflow_run(run_dir)  # still one run, finished, with both steps
    assert (run.info.run_id, run.info.status, run.info.run_name) == (mlflow_id, "FINISHED", "exp")
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(1, 2.5), (2, 2.0)]
    assert run.data.metrics["eval_loss/units"] == 3.1
    assert run.data.params["train.lr"] == "0.001" and run.data.params["train.report_to"] == "['wandb']"
    client.download_artifacts(run.info.run_id, "", str(tmp_path / "mlflow_artifacts"))
    assert (tmp_path / "mlflow_artifacts" / "resolved_config.yaml").read_text() == CONFIG_YAML
    assert (tmp_path / "mlflow_artifacts" / "data_report.md").read_text() == REPORT_MD

    # W&B: one offline directory per process that wrote to the run, all under the same run id.
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(p.name.endswith(f"-{wandb_id}") for p in wandb_runs)
    assert (run_dir / WANDB_ID_FILE).read_text() == wandb_id
    history = [entry for p in wandb_runs for entry in wandb_history(next(p.glob("*.wandb")))]
    assert [(step, m["loss"]) for step, m in history] == [(1, 2.5), (2, 2.0)]
    assert history[1][1]["eval_loss/units"] == 3.1
    for files in (p / "files" for p in wandb_runs):
        assert (files / "resolved_config.yaml").read_text() == CONFIG_YAML
        assert (files / "data_report.md").read_text() == REPORT_MD


def test_report_to_defaults_to_tensorboard_and_refuses_a_missing_package(monkeypatch):
    from instune import config

    assert validate_config(config_tree()).train.report_to == ["tensorboard"]
    assert validate_config(config_tree(report_to=["mlflow", "wandb", "mlflow"])).train.report_to == \
        ["mlflow", "wandb"]
    monkeypatch.setitem(config.OPTIONAL_TRACKERS, "wandb", "instune_no_such_package")
    with pytest.raises(UserError) as e:
        validate_config(config_tree(report_to=["tensorboard", "wandb"]))
    assert str(e.value).startswith("config: train.report_to: Value error, wandb not installed; pip install wandb")
    with pytest.raises(UserError, match=r"train\.report_to\.0: Input should be 'tensorboard', 'wandb' or 'mlflow'"):
        validate_config(config_tree(report_to=["comet"]))


def test_training_run_attaches_the_resolved_config_and_stages_add_the_data_report(tmp_path):
    from instune.config import config_to_yaml
    from instune.train.trainer import training_run

    c = validate_config(config_tree(report_to=["mlflow"], max_steps=3))
    run = training_run(c, "/models/base", rows=0)
    assert run.tracking.report_to == ["mlflow"] and run.tracking.name == "exp"
    assert run.tracking.attachments == {"resolved_config.yaml": config_to_yaml(c)}
    assert run.tracking.config["train"]["max_steps"] == 3
    # A sweep trial's run is named by its trial too: trials sharing one W&B/MLflow project stay apart.
    from instune.tune.trial import trial_run_name

    trials = [training_run(c, "/models/base", rows=0, run_name=trial_run_name(c.name, trial_id))
              for trial_id in ("a1b2c_00000", "a1b2c_00001")]
    assert [t.tracking.name for t in trials] == ["exp-a1b2c_00000", "exp-a1b2c_00001"]

    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.md").write_text(REPORT_MD)
    (tmp_path / "manifest.json").write_text('{"splits": {}}')
    assert data_report_attachments(str(tmp_path)) == {"data_report.md": REPORT_MD,
                                                      "data_manifest.json": '{"splits": {}}'}
    assert data_report_attachments(str(tmp_path / "missing")) == {}
