"""`instune submit` and `instune jobs`: checks before submitting, what a job ships, and a real job on a real head."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
import yaml
from ray_heads import end_head

from instune.errors import UserError
from instune.ray_jobs import (EXCLUDES, JOB_CONFIG, check_paths_for_cluster, connect, job_entrypoint, job_runtime_env,
                          pinned_requirements, pip_packages, plan_submission, stage_working_dir)

REPO = Path(__file__).resolve().parents[2]


def instune_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "instune.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ---------------------------------------------------------------- before submitting


def test_relative_output_dir_is_refused_with_the_field_named(tiny_config):
    config = tiny_config(Path("outputs/tiny"))
    with pytest.raises(UserError, match=r"^c\.yaml: output_dir: outputs/tiny is relative.*--set output_dir="):
        check_paths_for_cluster(config, "c.yaml")


def test_uri_output_dir_passes_and_a_uri_corpus_dir_is_refused_at_load(tiny_config, tmp_path):
    config = tiny_config(Path("/unused"), ["output_dir=s3://bucket/tiny", f"data.corpus.dir={tmp_path}/corpus"])
    check_paths_for_cluster(config, "c.yaml")
    with pytest.raises(UserError, match=r"data\.corpus\.dir: .*s3://bucket/tiny/corpus is a URI.*local path"):
        tiny_config(Path("/unused"), ["output_dir=s3://bucket/tiny"])


def test_relative_corpus_dir_and_inputs_under_outputs_are_refused(tiny_config, tmp_path):
    config = tiny_config(tmp_path, ["data.corpus.dir=corpus"])
    with pytest.raises(UserError, match=r"data\.corpus\.dir: corpus is relative"):
        check_paths_for_cluster(config, "c.yaml")
    config = tiny_config(tmp_path, ["eval.sets.0.path=outputs/tiny/corpus/eval/arithmetic.jsonl"])
    with pytest.raises(UserError, match=r"eval\.sets\[arithmetic\]\.path: outputs/tiny/.* under outputs/"):
        check_paths_for_cluster(config, "c.yaml")


def test_absolute_paths_pass(tiny_config, tmp_path):
    config = tiny_config(tmp_path)
    assert config.data.corpus.dir == str(tmp_path / "corpus")
    check_paths_for_cluster(config, "c.yaml")


def test_submit_refuses_a_local_only_config_before_contacting_any_cluster():
    # Port 9 (discard) has no job API: the config error must come first, with exit code 2 and one line.
    result = instune_cli("submit", "train", "configs/quickstart.yaml", "--address", "http://127.0.0.1:9")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "configs/quickstart.yaml: output_dir: outputs/quickstart is relative" in result.stderr


def test_unreachable_address_is_a_one_line_user_error(free_port):
    with pytest.raises(UserError, match=rf"^--address http://127\.0\.0\.1:{(port := free_port())}: cannot reach"):
        connect(f"http://127.0.0.1:{port}")


# ---------------------------------------------------------------- what a job ships


def test_pinned_requirements_pin_every_dependency_to_the_installed_public_version():
    pinned = pinned_requirements(REPO / "pyproject.toml")
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert len(pinned) == len(declared)
    assert f"ray[data,default,train,tune]=={ray.__version__}" in pinned
    import torch

    assert f"torch=={torch.__version__.split('+')[0]}" in pinned
    assert all("==" in p and "+" not in p for p in pinned)


def test_pip_modes(tmp_path):
    assert pip_packages("none", REPO) is None
    assert pip_packages("pinned", REPO) == pinned_requirements(REPO / "pyproject.toml")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# pinned for the cluster\ntransformers==5.24.0  # tokenizer fix\n\npeft==0.21.0\n")
    assert pip_packages(str(requirements), REPO) == ["transformers==5.24.0", "peft==0.21.0"]
    with pytest.raises(UserError, match="--pip latest: expected none, pinned or a requirements file"):
        pip_packages("latest", REPO)


def test_working_dir_is_the_project_without_local_state_plus_the_resolved_config(tmp_path):
    project = tmp_path / "project"
    for keep in ["instune/ray_jobs.py", "instune/__main__.py", "configs/quickstart.yaml", "pyproject.toml"]:
        (project / keep).parent.mkdir(parents=True, exist_ok=True)
        (project / keep).write_text("kept\n")
    for drop in [".venv/bin/python", "outputs/run/model.safetensors", ".git/HEAD", "instune/__pycache__/x.pyc",
                 "instune.egg-info/PKG-INFO", ".pytest_cache/v"]:
        (project / drop).parent.mkdir(parents=True, exist_ok=True)
        (project / drop).write_text("dropped\n")
    shipped = stage_working_dir(project, "name: tiny\n", tmp_path / "shipped")
    files = sorted(str(p.relative_to(shipped)) for p in shipped.rglob("*") if p.is_file())
    assert files == sorted(["instune/ray_jobs.py", "instune/__main__.py", "configs/quickstart.yaml", "pyproject.toml",
                            JOB_CONFIG])
    assert (shipped / JOB_CONFIG).read_text() == "name: tiny\n"
    assert {".venv", "outputs", ".git"} <= set(EXCLUDES)


def test_entrypoint_is_fixed_and_quoted():
    assert job_entrypoint("train") == f"python -m instune train {JOB_CONFIG}"
    assert job_entrypoint("eval", "/mnt/shared/a b;rm -rf ~/merged") == \
        f"python -m instune eval {JOB_CONFIG} --model '/mnt/shared/a b;rm -rf ~/merged'"
    with pytest.raises(AssertionError):
        job_entrypoint("train; curl evil")


def test_runtime_env_ships_pip_only_when_asked(tmp_path):
    assert job_runtime_env(tmp_path, None) == {"working_dir": str(tmp_path), "excludes": EXCLUDES}
    assert job_runtime_env(tmp_path, ["peft==0.21.0"])["pip"] == {"packages": ["peft==0.21.0"], "pip_check": False}


def test_plan_carries_the_resolved_config_with_overrides(tiny_config_file, tmp_path):
    config_file = tiny_config_file(tmp_path / "out")
    plan = plan_submission("train", str(config_file), ["train.lr=5e-4"])
    resolved = yaml.safe_load(plan.config_yaml)
    assert resolved["train"]["lr"] == 5e-4
    assert resolved["data"]["corpus"]["dir"] == str(tmp_path / "out" / "corpus")
    assert (plan.stage, plan.name, plan.pip, plan.overrides) == ("train", "tiny", None, ["train.lr=5e-4"])


def test_a_vlm_plan_is_checked_as_a_vlm_config(tmp_path):
    vlm = str(REPO / "configs/vlm_quickstart.yaml")
    with pytest.raises(UserError, match=r"vlm_quickstart\.yaml: output_dir: outputs/vlm_quickstart is relative"):
        plan_submission("vlm", vlm, [])
    with pytest.raises(UserError, match=r"output_dir: s3://b/v is a URI, and the vlm stage writes to a path only"):
        plan_submission("vlm", vlm, ["output_dir=s3://b/v", f"corpus.dir={tmp_path}"])
    with pytest.raises(UserError, match=r"data\.eval_sources\[d\]\.path: outputs/d\.json is under outputs/"):
        plan_submission("vlm", vlm, [f"output_dir={tmp_path}", "data.eval_sources=[{name: d, path: outputs/d.json}]"])
    plan = plan_submission("vlm", vlm, [f"output_dir={tmp_path}"])
    assert yaml.safe_load(plan.config_yaml)["corpus"]["dir"] == f"{tmp_path}/corpus" and plan.stage == "vlm"
    assert job_entrypoint("vlm") == f"python -m instune vlm {JOB_CONFIG}"


def test_the_job_entrypoint_runs_the_stage_commands():
    for stage in ["prepare", "train", "eval", "sweep", "run", "vlm"]:
        result = subprocess.run([sys.executable, "-m", "instune", stage, "/no/such/config.yaml"], cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert "instune: error: /no/such/config.yaml: config file not found" in result.stderr


# ---------------------------------------------------------------- a real job on a real head


@pytest.fixture
def loopback_head(tmp_path, free_port):
    """A Ray head started by cluster/static/start_head.sh on 127.0.0.1, with token auth, stopped afterwards.

    Yields (job API address, environment for clients). `ray stop` would stop every Ray on the machine, so the
    head runs with --block and is stopped by signalling that process, which takes its own processes down.
    """
    # Short: Ray puts Unix sockets under --temp-dir, and their paths must stay under 108 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="instune-head-", dir="/tmp"))
    token_file = tmp_path / "token"
    token_file.write_text(secrets.token_hex(32))
    gcs_port, dashboard_port = free_port(), free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    head_env = dict(env, HEAD_IP="127.0.0.1", RAY_PORT=str(gcs_port), DASHBOARD_PORT=str(dashboard_port),
                    RAY_CLIENT_PORT=str(free_port()),
                    # Ray Train's helpers look the cluster up by address; pin it, other clusters run here.
                    RAY_ADDRESS=f"127.0.0.1:{gcs_port}")
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        ["bash", "cluster/static/start_head.sh", "--block", "--temp-dir", str(temp_dir), "--num-cpus", "4",
         "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port())],
        cwd=REPO, env=head_env, stdout=log, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 180
        while instune_cli("jobs", "list", "--address", address, env=env).returncode != 0:
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the head's job API did not come up in 180 s"
            time.sleep(2)
        yield address, env
    finally:
        end_head(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_submit_runs_the_tiny_quickstart_as_a_job(loopback_head, tiny_config_file, tmp_path):
    address, env = loopback_head
    output_dir = tmp_path / "shared" / "tiny"
    config_file = tiny_config_file(output_dir)

    # Without the token the job API refuses, and says what to do in one line.
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(tmp_path)}
    refused = instune_cli("jobs", "list", "--address", address, env=no_token)
    assert refused.returncode == 2 and "the cluster wants its token" in refused.stderr

    submitted = instune_cli("submit", "run", str(config_file), "--address", address, "--set", "train.lr=2e-3",
                            env=env, timeout=900)
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-4000:]
    job_id = next(line.split()[2] for line in submitted.stdout.splitlines() if line.startswith("[submit] job "))
    # The logs streamed back are the job's: its entrypoint, then the run's summary of what it wrote.
    assert f"Running entrypoint for job {job_id}: python -m instune run {JOB_CONFIG}" in submitted.stdout
    assert str(output_dir / "train" / "run" / "metrics.jsonl") in submitted.stdout
    assert submitted.stdout.rstrip().endswith(f"[submit] job {job_id} SUCCEEDED")

    status = instune_cli("jobs", "status", job_id, "--address", address, env=env)
    assert status.stdout.startswith(f"{job_id} SUCCEEDED")
    listed = instune_cli("jobs", "list", "--address", address, env=env)
    assert [line.split()[:3] for line in listed.stdout.splitlines()] == [[job_id, "SUCCEEDED", "run"]]
    logs = instune_cli("jobs", "logs", job_id, "--address", address, env=env)
    assert f"Running entrypoint for job {job_id}: python -m instune run {JOB_CONFIG}" in logs.stdout
    stop = instune_cli("jobs", "stop", job_id, "--address", address, env=env)
    assert stop.stdout.strip() == f"{job_id} was not running"
    missing = instune_cli("jobs", "status", "no-such-job", "--address", address, env=env)
    assert missing.returncode == 2 and "no-such-job: no such job" in missing.stderr

    # The outputs are on the "shared" path, written by the job, with the override applied.
    resolved = yaml.safe_load((output_dir / "resolved_config.yaml").read_text())
    assert resolved["train"]["lr"] == 2e-3
    steps = [json.loads(line)["step"] for line in (output_dir / "train" / "run" / "metrics.jsonl").open()]
    assert steps == [1, 2]
    assert list((output_dir / "merged").glob("*.safetensors"))
    tuned = json.loads((output_dir / "eval" / "tuned.json").read_text())
    assert [s["name"] for s in tuned] == ["arithmetic"]
