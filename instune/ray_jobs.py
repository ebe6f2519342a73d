"""Stages as Ray jobs: `instune submit STAGE CONFIG` runs one on a cluster; `instune jobs list|status|logs|stop`
follows it.

A submitted job's working directory is a copy of the project (without .venv, outputs, .git and caches) with the
fully resolved config beside it as `job_config.yaml`, so the job runs exactly the config that was validated
here. The entrypoint is fixed, `python -m instune STAGE job_config.yaml`: nothing in a config reaches a shell.

Outputs go to the config's `output_dir`: a cloud URI (s3://, gs://; stages publish there and Ray Train keeps
its checkpoints there, see instune/storage.py), or an absolute path that every node mounts (NFS, EFS,
Filestore, a ReadWriteMany volume): the job's working directory is a temporary copy that vanishes with the
job, and Ray Train keeps its checkpoints under `output_dir/train`, which workers on other nodes must reach.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from instune.errors import UserError

if TYPE_CHECKING:
    from instune.config import ExperimentConfig

STAGES = ("prepare", "train", "eval", "sweep", "run", "vlm")  # vlm: a VlmExperimentConfig (instune/vlm_run.py)
# Never shipped: the local environment, outputs of local runs, history and caches.
EXCLUDES = [".venv", "outputs", ".git", "__pycache__", "*.egg-info", ".pytest_cache"]
JOB_CONFIG = "job_config.yaml"
TERMINAL_STATUSES = {"SUCCEEDED", "FAILED", "STOPPED"}
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def project_root() -> Path:
    """The directory holding pyproject.toml and instune/: what a job ships."""
    return Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- checks before submitting


def check_paths_for_cluster(config: ExperimentConfig, source: str) -> None:
    """Raise UserError for a path the job could not use: outputs it would lose, inputs it would not have."""
    from instune.config import VlmExperimentConfig

    written = [("output_dir", config.output_dir, f"/mnt/shared/instune/{config.name}")]
    if isinstance(config, VlmExperimentConfig):
        if "://" in config.output_dir:  # vlm_run writes with local paths only; it does not publish to buckets
            raise UserError(f"{source}: output_dir: {config.output_dir} is a URI, and the vlm stage writes to a "
                            f"path only; give an absolute path on storage every node mounts")
        corpus, corpus_field = config.corpus, "corpus.dir"
        read = [(f"data.{kind}[{s.name}].path", s.path) for kind in ("sources", "eval_sources")
                for s in getattr(config.data, kind)] + [("model.path", config.model.path)]
    else:
        corpus, corpus_field = config.data.corpus, "data.corpus.dir"
        read = [(f"data.sources[{s.name}].path", s.path) for s in config.data.sources]
        read += [(f"eval.sets[{s.name}].path", s.path) for s in config.eval.sets]
        read += [("model.path", config.model.path), ("model.tokenizer_path", config.model.tokenizer_path)]
    if corpus is not None:
        written.append((corpus_field, corpus.dir, "'${output_dir}/corpus'"))
    for field, value, example in written:
        # A URI output_dir is fine: stages publish to it (instune/storage.py). data.corpus.dir cannot be one
        # (config.py refuses it).
        if "://" not in value and not Path(value).is_absolute():
            raise UserError(f"{source}: {field}: {value} is relative, and a job runs in a temporary copy of the "
                            f"project, so it would be lost; give an absolute path on storage every node mounts, "
                            f"e.g. --set {field}={example}")
    for field, value in read:
        for path in [value] if isinstance(value, str) else (value or []):
            first = PurePosixPath(path).parts[0] if path and not Path(path).is_absolute() else None
            if first in EXCLUDES:
                raise UserError(f"{source}: {field}: {path} is under {first}/, which a job does not ship; "
                                f"give an absolute path on storage every node mounts")


def pinned_requirements(pyproject: Path) -> list[str]:
    """pyproject's dependencies pinned to the versions installed here, e.g. 'ray[default]==2.60.0'."""
    import tomllib
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement
    from packaging.version import Version

    pinned = []
    for text in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        requirement = Requirement(text)
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            raise UserError(f"--pip pinned: {requirement.name} (a dependency in {pyproject}) is not installed "
                            f"here, so there is no version to pin") from None
        extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
        # The public version: a local label such as torch's "+cpu" names a build no registry has.
        pinned.append(f"{requirement.name}{extras}=={Version(installed).public}")
    return pinned


def pip_packages(mode: str, project_dir: Path) -> list[str] | None:
    """What the job's `pip` runtime env installs: nothing ("none"), the pinned dependencies, or a file's lines."""
    if mode == "none":
        return None
    if mode == "pinned":
        return pinned_requirements(project_dir / "pyproject.toml")
    path = Path(mode)
    if not path.is_file():
        raise UserError(f"--pip {mode}: expected none, pinned or a requirements file")
    lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line]


# ---------------------------------------------------------------- submitting


def stage_working_dir(project_dir: Path, config_yaml: str, destination: Path) -> Path:
    """Copy the project (less EXCLUDES) to `destination` and write the resolved config beside it."""
    shutil.copytree(project_dir, destination, ignore=shutil.ignore_patterns(*EXCLUDES), symlinks=True)
    (destination / JOB_CONFIG).write_text(config_yaml, encoding="utf-8")
    return destination


def job_runtime_env(working_dir: Path, pip: list[str] | None) -> dict:
    runtime_env = {"working_dir": str(working_dir), "excludes": list(EXCLUDES)}
    if pip:
        runtime_env["pip"] = {"packages": pip, "pip_check": False}
    return runtime_env


def job_entrypoint(stage: str, model: str | None = None) -> str:
    """The job's command line; only the stage name (one of STAGES) and an eval model path go into it."""
    assert stage in STAGES, f"unknown stage {stage}"
    words = ["python", "-m", "instune", stage, JOB_CONFIG]
    if model:
        words += ["--model", model]
    return shlex.join(words)


def connect(address: str | None):
    """A JobSubmissionClient for the head's job API (the dashboard port, 8265 by default)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS
    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise UserError(f"--address {address}: the cluster wants its token; set RAY_AUTH_MODE=token and give the "
                        f"token in ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN") from None
    except (ConnectionError, RuntimeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--address {address}: cannot reach the Ray job API ({first_line})") from None


@dataclass
class Submission:
    """A stage ready to submit: everything checked, nothing sent yet."""

    stage: str
    config_path: str
    overrides: list[str]
    config_yaml: str  # the resolved config the job runs
    name: str
    output_dir: str
    pip: list[str] | None
    model: str | None


def plan_submission(stage: str, config_path: str, overrides: list[str], pip: str = "none",
                    model: str | None = None) -> Submission:
    """Load and check the config and options here, before any cluster is contacted. Raises UserError."""
    from instune.config import VlmExperimentConfig, config_to_yaml, load_config

    config = load_config(config_path, overrides, schema=VlmExperimentConfig if stage == "vlm" else None)
    check_paths_for_cluster(config, config_path)
    if not (project_root() / "pyproject.toml").is_file():
        # An installed package (site-packages) is not a project to ship: it lacks pyproject.toml.
        raise UserError(f"instune submit: {project_root()} has no pyproject.toml; run it from a checkout of "
                        f"the project (pip install -e .)")
    if model is not None and not Path(model).is_absolute():
        raise UserError(f"--model {model}: give an absolute path on storage every node mounts")
    return Submission(stage, str(config_path), list(overrides), config_to_yaml(config), config.name,
                      config.output_dir, pip_packages(pip, project_root()), model)


def submit(client, submission: Submission) -> str:
    """Ship the project and the resolved config as the job's working directory; returns the submission id."""
    s = submission
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", s.name)[:40]
    submission_id = f"instune-{s.stage}-{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    metadata = {"instune_stage": s.stage, "instune_config": s.config_path, "instune_name": s.name,
                "instune_output_dir": s.output_dir, "instune_overrides": " ".join(s.overrides)}
    with tempfile.TemporaryDirectory(prefix="instune-job-") as tmp:
        # The client zips and uploads the working directory inside submit_job, so the copy can go after.
        working_dir = stage_working_dir(project_root(), s.config_yaml, Path(tmp) / "project")
        return client.submit_job(entrypoint=job_entrypoint(s.stage, s.model), submission_id=submission_id,
                                 runtime_env=job_runtime_env(working_dir, s.pip), metadata=metadata)


def follow_logs(client, job_id: str, out=None) -> str:
    """Print the job's logs as they come until it ends; returns its final status ("SUCCEEDED", ...)."""
    out = out or sys.stdout

    async def tail():
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())
    # The log stream closes when the driver exits; the status may lag it by a moment.
    status = str(client.get_job_status(job_id).value)
    deadline = time.monotonic() + 30
    while status not in TERMINAL_STATUSES and time.monotonic() < deadline:
        time.sleep(0.5)
        status = str(client.get_job_status(job_id).value)
    return status


def job_rows(client) -> list[dict]:
    """One dict per job, newest first: id, status, stage, config, start time, message."""
    rows = []
    for job in client.list_jobs():
        metadata = job.metadata or {}
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) \
            if job.start_time else "-"
        rows.append({"id": job.submission_id or job.job_id, "status": str(job.status.value),
                     "stage": metadata.get("instune_stage", "-"), "config": metadata.get("instune_config", "-"),
                     "started": started, "start_ms": job.start_time or 0, "message": job.message or ""})
    return sorted(rows, key=lambda r: r["start_ms"], reverse=True)


# ---------------------------------------------------------------- command line


def add_job_commands(sub) -> None:
    """Add `submit` and `jobs` to the `instune` subcommand parser."""
    address_help = f"the head's job API (default: $RAY_API_SERVER_ADDRESS or {DEFAULT_ADDRESS})"
    p = sub.add_parser("submit", help="run a stage as a Ray job on a cluster and stream its logs")
    p.add_argument("stage", choices=STAGES)
    p.add_argument("config", help="experiment YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by dotted path, e.g. --set train.lr=2e-4")
    p.add_argument("--address", help=address_help)
    p.add_argument("--pip", default="none", metavar="none|pinned|FILE",
                   help="packages the job installs first: none (default: the cluster has them), pinned "
                        "(pyproject's dependencies at the versions installed here) or a requirements file")
    p.add_argument("--model", help="for eval: the model or adapter directory, an absolute path on shared storage "
                                   "(default: the run's merged model)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return without following")

    jobs = sub.add_parser("jobs", help="list, inspect and stop Ray jobs")
    actions = jobs.add_subparsers(dest="action", required=True)
    for action, help_text in [("list", "jobs on the cluster, newest first"), ("status", "one job's status"),
                              ("logs", "one job's logs"), ("stop", "stop a running job")]:
        a = actions.add_parser(action, help=help_text)
        if action != "list":
            a.add_argument("job_id")
        if action == "logs":
            a.add_argument("--follow", action="store_true", help="keep printing until the job ends")
        a.add_argument("--address", help=address_help)


def dispatch_job_command(args) -> int:
    """Run `submit` or `jobs ACTION`; the exit code is 0 unless a followed job did not succeed."""
    if args.command == "submit":
        submission = plan_submission(args.stage, args.config, args.overrides, args.pip, args.model)
        client = connect(args.address)
        job_id = submit(client, submission)
        print(f"[submit] job {job_id}", flush=True)
        if args.no_wait:
            return 0
        try:
            status = follow_logs(client, job_id)
        except KeyboardInterrupt:
            print(f"\n[submit] stopped following; the job goes on. Stop it with: instune jobs stop {job_id}")
            return 130
        print(f"[submit] job {job_id} {status}")
        return 0 if status == "SUCCEEDED" else 1
    client = connect(args.address)
    if args.action == "list":
        for row in job_rows(client):
            print(f"{row['id']:48s} {row['status']:10s} {row['stage']:8s} {row['started']}  {row['config']}")
        return 0
    try:
        info = client.get_job_info(args.job_id)
    except RuntimeError as e:
        if "does not exist" not in str(e):
            raise
        raise UserError(f"{args.job_id}: no such job on {client.get_address()} (see instune jobs list)") from None
    if args.action == "status":
        print(f"{args.job_id} {info.status.value}" + (f": {info.message}" if info.message else ""))
        return 0
    if args.action == "logs":
        if args.follow:
            status = follow_logs(client, args.job_id)
            return 0 if status == "SUCCEEDED" else 1
        print(client.get_job_logs(args.job_id), end="")
        return 0
    stopped = client.stop_job(args.job_id)
    print(f"{args.job_id} {'stopping' if stopped else 'was not running'}")
    return 0
