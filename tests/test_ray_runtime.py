"""start_ray with another cluster's leftovers on the machine: a stale current-cluster file, a live `ray start`
head. Real Ray clusters, each under its own RAY_TMPDIR, so Ray's current-cluster file here is the test's own."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from ray_heads import end_head

from instune import ray_runtime, ray_waits
from instune.config import ScalingConfig
from instune.errors import UserError
from instune.ray_runtime import start_ray, stop_ray, unused_port

ONE_WORKER = ScalingConfig(num_workers=1, resource_wait_s=2)


@pytest.fixture
def ray_tmpdir(monkeypatch):
    """A RAY_TMPDIR of the test's own (short: Ray's socket paths under it must stay under 108 bytes); Ray's
    current-cluster file is then <it>/ray/ray_current_cluster."""
    directory = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    (directory / "ray").mkdir()
    monkeypatch.setenv("RAY_TMPDIR", str(directory))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_runtime, "options", ray_runtime.RayOptions())
    yield directory
    stop_ray()
    shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def live_head(ray_tmpdir: Path, num_cpus: int = 1):
    """`ray start --head` on free ports, recorded in the current-cluster file as a user's would be; its
    processes are ended by pid afterwards (`ray stop` would stop every Ray on the machine)."""
    port = unused_port()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--port", str(port), "--num-cpus", str(num_cpus),
         "--temp-dir", str(ray_tmpdir / "ray"), "--include-dashboard", "false", "--disable-usage-stats",
         "--ray-client-server-port", str(unused_port()), "--dashboard-agent-listen-port", str(unused_port()),
         "--metrics-export-port", str(unused_port())],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        recorded = ray_tmpdir / "ray" / "ray_current_cluster"
        deadline = time.monotonic() + 120
        while not (recorded.is_file() and ray_runtime.answers(recorded.read_text().strip())):
            assert head.poll() is None and time.monotonic() < deadline, "the second head did not start"
            time.sleep(0.5)
        yield recorded.read_text().strip()
    finally:
        end_head(head)


def what_a_worker_sees():
    """(RAY_ADDRESS, the state of the asking actor by the state API) inside a Ray actor: the lookup Ray
    Train's placement-group cleaner makes for its controller."""
    import ray

    @ray.remote(num_cpus=0)
    class Probe:
        def look_up(self):
            from ray.util.state import get_actor

            found = get_actor(ray.get_runtime_context().get_actor_id(), timeout=20)
            return os.environ.get("RAY_ADDRESS"), found.state if found else None

    return ray.get(Probe.remote().look_up.remote(), timeout=120)


def test_a_cluster_not_at_the_address_its_processes_were_given_is_an_error(ray_tmpdir, monkeypatch):
    """start_private exports the chosen address before ray.init; a GCS elsewhere (here a stand-in for Ray
    reporting another port: no cluster is started) must stop the command, also under python -O."""
    import ray

    shut_down = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(ray, "shutdown", lambda: shut_down.append(True))
    monkeypatch.setattr(ray, "get_runtime_context", lambda: type("Context", (), {"gcs_address": "10.9.9.9:1"}))
    with pytest.raises(RuntimeError, match=r"^Ray started this command's cluster at 10\.9\.9\.9:1, not at .*:\d+, "):
        ray_runtime.start_private(1, dashboard=False)
    assert shut_down == [True]
    assert "RAY_GCS_SERVER_PORT" not in os.environ
    stop_ray()
    assert "RAY_ADDRESS" not in os.environ


@pytest.mark.parametrize("asked", [None, "1"])
def test_a_private_cluster_starts_without_ray_trains_preemption_watcher_unless_asked(ray_tmpdir, monkeypatch, asked):
    """Nothing drains one node of a cluster that is this machine alone; the watcher's actor would only take CPU
    from every Train run's start. A value set by hand is kept, and stop_ray restores the environment."""
    import ray

    if asked:
        monkeypatch.setenv(ray_runtime.PREEMPTION_WATCHER_ENV, asked)
    seen_by_ray = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen_by_ray.append(
        os.environ.get(ray_runtime.PREEMPTION_WATCHER_ENV)))
    monkeypatch.setattr(ray, "get_runtime_context",
                        lambda: type("Context", (), {"gcs_address": os.environ["RAY_ADDRESS"]}))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    ray_runtime.start_private(1, dashboard=False)
    assert seen_by_ray == [asked or "0"]  # Ray's processes inherit it; Train's controller reads it
    stop_ray()
    assert os.environ.get(ray_runtime.PREEMPTION_WATCHER_ENV) == asked


def a_killed_train_run_frees_its_cpus(storage: Path) -> bool:
    """Whether every CPU is free again within 60 s after the actor driving a Ray Train run (one worker, waiting)
    is killed while the run's loop runs, as Tune ends a trial that ASHA stops. The run's placement group
    outlives its controller; Ray Train's placement-group cleaner frees it once the state API says the controller
    is dead, and it asks the cluster in its RAY_ADDRESS (issue 20: asking another, nothing is ever freed)."""
    import ray

    @ray.remote(num_cpus=0)
    class Driver:
        def fit(self, marker: str):
            import ray.train
            from ray.train.torch import TorchTrainer

            def loop(config):
                Path(config["marker"]).touch()
                time.sleep(600)

            TorchTrainer(loop, train_loop_config={"marker": marker}, scaling_config=ray.train.ScalingConfig(
                num_workers=1), run_config=ray.train.RunConfig(storage_path=str(storage), name="run")).fit()

    marker = storage / "loop_running"
    driver = Driver.remote()
    driver.fit.remote(str(marker))
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert time.monotonic() < deadline, "the Train run's loop did not start in 180 s"
        time.sleep(0.5)
    total = ray.cluster_resources()["CPU"]
    assert ray.available_resources().get("CPU", 0) < total, "the run's worker holds no CPU"
    ray.kill(driver)
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < total:
        if time.monotonic() > deadline:
            return False
        time.sleep(1)
    return True


@pytest.mark.slow  # a private cluster with its dashboard, as a sweep starts it (~25 s): the state API needs it
def test_a_stale_current_cluster_file_is_noted_and_ignored(ray_tmpdir, tmp_path, capsys, monkeypatch):
    import ray

    dead = f"127.0.0.1:{unused_port()}"
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(dead)
    monkeypatch.setattr(ray_waits, "CHECK_EVERY_S", 0.2)
    start_ray(ONE_WORKER, tmp_path / "out", dashboard=True)
    console = capsys.readouterr()
    assert "Started a local Ray instance" not in console.err
    assert not any(type(h).__name__ == "PlainRayHandler" for h in logging.getLogger("ray").handlers)
    lines = console.out.splitlines()
    address = ray.get_runtime_context().gcs_address
    assert lines == [
        f"[ray] ignoring {ray_tmpdir}/ray/ray_current_cluster: it names {dead}, where no Ray cluster answers "
        "(left behind by one that is gone)",
        f"[ray] started a private Ray cluster at {address} with {ray_runtime.cpus_for(ONE_WORKER)} CPUs; "
        f"Ray's logs: {tmp_path / 'out' / 'logs' / 'ray.log'}"]
    # Inside a worker, the state API finds this cluster's actor (through the stale file it would ask the dead
    # address, and fail, as Ray Train's placement-group cleaner did).
    assert what_a_worker_sees() == (address, "ALIVE")
    assert os.environ["RAY_ADDRESS"] == address

    # What workers print: instune's "[stage] " lines on the console, everything in the log file.
    @ray.remote(num_cpus=0)
    def chatty():
        print("[probe] 1/2 steps")
        print("Reporting training result 1")

    ray.get(chatty.remote())
    log = tmp_path / "out" / "logs" / "ray.log"
    deadline = time.monotonic() + 30
    while "Reporting training result 1" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    console = capsys.readouterr()
    assert console.out == "[probe] 1/2 steps\n"

    # A placement group that waits past scaling.resource_wait_s for CPUs another holds ends the run (the
    # main thread gets KeyboardInterrupt; the CLI then exits 3) with one line naming the holder.
    from ray.util.placement_group import placement_group

    holder = placement_group([{"CPU": ray.cluster_resources()["CPU"]}])
    holder.wait(timeout_seconds=60)
    waiter = placement_group([{"CPU": 1}])
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        while time.monotonic() - started < 60:
            time.sleep(0.05)
    assert ONE_WORKER.resource_wait_s <= time.monotonic() - started < 30
    assert ray_waits.stuck().startswith(f"placement group {waiter.id.hex()[:8]} of job ")
    assert capsys.readouterr().err == f"instune: error: {ray_waits.stuck()}\n"
    stop_ray()
    assert "RAY_ADDRESS" not in os.environ and "RAY_GCS_SERVER_PORT" not in os.environ
    # Ray's own start-up lines went to the log file, not the console.
    text = log.read_text()
    assert "Started a local Ray instance" in text and "chatty pid=" in text and "[probe] 1/2 steps" in text


@pytest.mark.slow
def test_beside_a_live_head_a_private_cluster_by_default_and_the_head_with_join(ray_tmpdir, tmp_path, capsys):
    import ray

    with live_head(ray_tmpdir, num_cpus=1) as head:
        start_ray(ONE_WORKER, tmp_path / "private", dashboard=True)
        private = ray.get_runtime_context().gcs_address
        assert private != head
        assert capsys.readouterr().out.splitlines() == [
            f"[ray] started a private Ray cluster at {private} with {ray_runtime.cpus_for(ONE_WORKER)} CPUs, "
            f"beside the one at {head} (--join runs there instead); "
            f"Ray's logs: {tmp_path / 'private' / 'logs' / 'ray.log'}"]
        # The head is named in the current-cluster file, but workers look up the private cluster.
        assert what_a_worker_sees() == (private, "ALIVE")
        # And so Ray Train's placement-group cleaner frees a stopped run's CPUs on it (the stale-file case of
        # this is a whole ASHA sweep, in tests/tune/test_sweep.py).
        assert a_killed_train_run_frees_its_cpus(tmp_path), "the killed Train run's CPU was not freed in 60 s"
        stop_ray()

        # --join, and -v: Ray's own lines come back on the console.
        ray_runtime.options = ray_runtime.RayOptions(join=True, verbose=True)
        start_ray(ONE_WORKER, tmp_path / "joined")
        assert ray.get_runtime_context().gcs_address == head
        assert ray.cluster_resources()["CPU"] == 1
        console = capsys.readouterr()
        assert console.out.splitlines() == [
            f"[ray] joined the Ray cluster at {head} (--join; without it a command starts a private one); "
            f"Ray's logs: {tmp_path / 'joined' / 'logs' / 'ray.log'}"]
        # Ray's console handler stays beside the file (pytest's capture closed the stream Ray's handler took
        # when a test before created it, so the handler is checked rather than what it printed).
        assert any(type(h).__name__ == "PlainRayHandler" for h in logging.getLogger("ray").handlers)
        assert f"Connecting to existing Ray cluster at address: {head}" in \
            (tmp_path / "joined" / "logs" / "ray.log").read_text()
        stop_ray()


def test_join_without_a_live_cluster_is_a_one_line_error(ray_tmpdir, tmp_path, monkeypatch):
    import ray

    dead = f"127.0.0.1:{unused_port()}"
    monkeypatch.setenv("RAY_ADDRESS", dead)
    with pytest.raises(UserError, match=f"RAY_ADDRESS: no Ray cluster answers at {dead}"):
        start_ray(ONE_WORKER, tmp_path)
    monkeypatch.delenv("RAY_ADDRESS")

    ray_runtime.options = ray_runtime.RayOptions(join=True)
    with pytest.raises(UserError, match=r"--join: no Ray cluster runs on this machine \(.*ray_current_cluster "
                                        r"does not exist\)"):
        start_ray(ONE_WORKER, tmp_path)
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(dead)
    with pytest.raises(UserError, match=f"names {dead}, where none answers"):
        start_ray(ONE_WORKER, tmp_path)
    assert not ray.is_initialized()


@pytest.mark.parametrize("stage_ends", ["interrupted", "aborted", "returned"])
def test_the_cli_exits_3_after_a_stuck_wait_however_the_stage_ends(monkeypatch, stage_ends):
    """The watcher interrupts the main thread; Ray Train may turn that into another error or an exit, and
    Tune into an early, normal return. The watcher printed the line; the CLI only sets the exit code."""
    from instune import cli

    def dispatch(args):
        monkeypatch.setitem(ray_waits._watch, "stuck", "placement group 1a2b3c4d of job 01000000 has waited ...")
        if stage_ends == "interrupted":
            raise KeyboardInterrupt
        if stage_ends == "aborted":
            raise RuntimeError("Training run aborted")

    monkeypatch.setattr(cli, "dispatch", dispatch)
    assert cli.main(["prepare", "c.yaml"]) == 3
    monkeypatch.setitem(ray_waits._watch, "stuck", None)
    monkeypatch.setattr(cli, "dispatch", lambda args: None)
    assert cli.main(["prepare", "c.yaml"]) == 0
