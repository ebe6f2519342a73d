"""Experiment trackers for a training run's metrics (`train.report_to`): TensorBoard, Weights & Biases, MLflow.

Each gets every metric the loop reports, at its step, plus the resolved config and the data report as files
(`Tracking.attachments`). They run where Ray Train's metrics callback runs (its controller, on the driver's
node), so they write beside the run: TensorBoard to `run_dir/tensorboard`, W&B's local files to
`run_dir/wandb` (online or not as WANDB_MODE says), MLflow to MLFLOW_TRACKING_URI or else a SQLite store at
`run_dir/mlflow.db` with the artifacts in `run_dir/mlflow_artifacts` (`mlflow ui --backend-store-uri
sqlite:///.../mlflow.db` shows it). With a bucket output_dir these local files are uploaded with the run's metrics.

The driver's WANDB_* and MLFLOW_* variables travel with the callback (the controller is another process,
which a Ray job or a long-lived cluster may have started with another environment). A run started again on
the same output_dir resumes into the same W&B and MLflow run: their ids are kept in the run directory.
wandb and mlflow are optional packages; config.py refuses a tracker whose package is missing.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

# The project (W&B) or experiment (MLflow) runs go to, unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME say.
DEFAULT_PROJECT = "instune"
TENSORBOARD_DIR = "tensorboard"
ATTACHMENTS_DIR = "attachments"
WANDB_ID_FILE = "wandb_run_id"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlflow_artifacts"
MLFLOW_ID_FILE = "mlflow_run_id"
ENV_PREFIXES = ("WANDB_", "MLFLOW_")
# MLflow takes at most 100 params per call and 6000 characters per value.
MLFLOW_PARAMS_PER_CALL = 100
MLFLOW_PARAM_CHARS = 6000


def tracker_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}


@dataclass
class Tracking:
    """Where a run's metrics go besides metrics.jsonl, and the files attached to it."""

    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    name: str = "run"
    # The resolved config as a tree: W&B's run config, MLflow's params (flattened).
    config: dict = field(default_factory=dict)
    # File name -> text, attached to the run: resolved_config.yaml, the data report.
    attachments: dict[str, str] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=tracker_environment)


def data_report_attachments(data_dir: str) -> dict[str, str]:
    """The prepared data's report and manifest (local directory or URI) as attachments; those missing are left out."""
    from instune import storage
    from instune.data.manifest import MANIFEST
    from instune.data.data_report import REPORT_DIR

    found = {}
    for name, location in [("data_report.md", storage.join(data_dir, REPORT_DIR, "report.md")),
                           ("data_manifest.json", storage.join(data_dir, MANIFEST))]:
        if storage.is_file(location):
            found[name] = storage.read_text(location)
    return found


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 0.1}} -> {"train.lr": "0.1"}; lists and None as their text."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def numeric(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool)}


def _remembered_id(path: Path) -> str | None:
    return path.read_text().strip() if path.is_file() else None


class TensorBoardTracker:
    def __init__(self, run_dir: Path, tracking: Tracking):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR))
        for name, text in tracking.attachments.items():
            # Markdown in TensorBoard's text tab; fenced so YAML and JSON keep their layout.
            self.writer.add_text(name, text if name.endswith(".md") else f"```\n{text}\n```", 0)

    def log(self, metrics: dict, step: int) -> None:
        for name, value in numeric(metrics).items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, tracking: Tracking):
        import wandb

        id_file = run_dir / WANDB_ID_FILE
        run_id = _remembered_id(id_file) or uuid.uuid4().hex[:12]
        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), name=tracking.name,
                              id=run_id, resume="allow", dir=str(run_dir), config=tracking.config,
                              reinit="create_new")
        id_file.write_text(run_id)
        attached = run_dir / ATTACHMENTS_DIR
        for name in tracking.attachments:
            self.run.save(str(attached / name), base_path=str(attached), policy="now")

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(numeric(metrics), step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def mlflow_tracking_uri(run_dir: Path) -> str:
    """MLFLOW_TRACKING_URI, else a SQLite store beside the run (MLflow 3 refuses its old file store)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / MLFLOW_DB).resolve()}"


class MlflowTracker:
    def __init__(self, run_dir: Path, tracking: Tracking):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(tracking_uri=mlflow_tracking_uri(run_dir))
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_PROJECT)
        experiment = self.client.get_experiment_by_name(experiment_name)
        # A server keeps artifacts where it is configured to; the local store keeps them beside the run.
        artifacts = None if os.environ.get("MLFLOW_TRACKING_URI") else (run_dir / MLFLOW_ARTIFACTS).resolve().as_uri()
        experiment_id = experiment.experiment_id if experiment else \
            self.client.create_experiment(experiment_name, artifact_location=artifacts)
        id_file = run_dir / MLFLOW_ID_FILE
        self.run_id = _remembered_id(id_file)
        if self.run_id:
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=tracking.name).info.run_id
            id_file.write_text(self.run_id)
            params = [Param(k, v[:MLFLOW_PARAM_CHARS]) for k, v in flatten(tracking.config).items()]
            for start in range(0, len(params), MLFLOW_PARAMS_PER_CALL):
                self.client.log_batch(self.run_id, params=params[start:start + MLFLOW_PARAMS_PER_CALL])
        for name, text in tracking.attachments.items():
            self.client.log_text(self.run_id, text, name)

    def log(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in numeric(metrics).items()])

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


def open_trackers(tracking: Tracking, run_dir: Path) -> list:
    """One open tracker per name in `tracking.report_to`, writing beside `run_dir`; the attachments are also
    written to `run_dir/attachments`."""
    for key, value in tracking.environment.items():
        os.environ[key] = value
    attached = run_dir / ATTACHMENTS_DIR
    attached.mkdir(parents=True, exist_ok=True)
    for name, text in tracking.attachments.items():
        (attached / name).write_text(text, encoding="utf-8")
    return [TRACKERS[name](run_dir, tracking) for name in tracking.report_to]
