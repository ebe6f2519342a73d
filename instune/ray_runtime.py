"""Ray for a command: a private cluster of its own, or on purpose an existing one, and nothing else.

What a local command does when a Ray cluster already runs on this machine (one `ray start` recorded in Ray's
current-cluster file, /tmp/ray/ray_current_cluster):
  - by default it starts a private cluster beside it, sized for the config, and says so in one line;
  - with `--join` it runs on that cluster instead, as a bare `ray.init()` would;
  - a current-cluster file whose cluster no longer answers (a crash, a killed container) is noted in one line
    and ignored;
  - RAY_ADDRESS (set for a Ray job, or by hand) always names the cluster to join.

Whichever cluster a command uses, everything Ray runs for it must address that cluster. Ray's helpers that
are not given an address find one through RAY_ADDRESS, else through the current-cluster file (Ray's
`get_ray_address_from_environment`); Ray Train's placement-group cleaner does so in a worker process, through
the state API, to learn whether a stopped trial's Train run is gone. Asking another cluster (or a dead one),
it never frees that run's CPUs, and the next trial waits for them forever (issue 20). So the started or
joined cluster's address is put in RAY_ADDRESS for this process and for every worker: for a private cluster
by choosing its GCS port up front (RAY_GCS_SERVER_PORT) and exporting the address before Ray starts, since
Ray's processes inherit the driver's environment; for a joined one through the job's runtime environment.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from instune.errors import UserError


@dataclass
class RayOptions:
    """How this process uses Ray. Set by the CLI's flags: they describe the command, not the experiment, so
    they are not config fields."""

    join: bool = False  # run on the `ray start` cluster of this machine instead of a private one
    verbose: bool = False  # Ray's own log lines on the console as well as in the log file


options = RayOptions()

# The environment as it was before start_ray changed it, for stop_ray (tests run several clusters in turn).
_saved_env: dict[str, str | None] = {}


# Ray Train starts a preemption-watcher actor with every worker group, to hear of a node being drained (a spot
# node reclaimed). A private cluster is this machine alone: a drain of it ends the command anyway. The watcher's
# process costs ~1.4 s of CPU per group (tests/train: 2-step runs on 2 cores, bench in the commit message), so a
# private cluster starts without it unless the variable is set.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def unused_port() -> int:
    """A TCP port nothing listens on now (other clusters may hold Ray's default ports)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(address: str, timeout_s: float = 1.0) -> bool:
    """Whether something accepts connections at host:port (a live GCS does)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def current_cluster_file() -> Path:
    """Ray's record of the last `ray start` on this machine (under RAY_TMPDIR when set)."""
    from ray._common.utils import get_ray_address_file

    return Path(get_ray_address_file(None))


def recorded_cluster() -> tuple[str | None, bool]:
    """(address in the current-cluster file or None, whether a cluster answers there)."""
    path = current_cluster_file()
    address = path.read_text().strip() if path.is_file() else ""
    return (address, answers(address)) if address else (None, False)


def cpus_for(scaling) -> int:
    """Logical CPUs for a private cluster: this machine's, and at least one more than the training workers
    reserve: otherwise, on a 2-core laptop, two 1-CPU workers leave Ray Data no CPU to read their shards with,
    and the run hangs."""
    needed = math.ceil(scaling.num_workers * scaling.cpus_per_worker) + 1 if scaling else 1
    return max(os.cpu_count() or 1, needed)


def _set_env(name: str, value: str | None) -> None:
    _saved_env.setdefault(name, os.environ.get(name))
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def start_ray(scaling=None, log_dir: Path | None = None, dashboard: bool = False) -> None:
    """Start a private Ray cluster, or join RAY_ADDRESS's or (with options.join) this machine's; print one line
    saying which. Ray's own output goes to `log_dir`/ray.log (instune/ray_console.py); a placement group
    waiting longer than `scaling.resource_wait_s` for resources ends the run (instune/ray_waits.py).

    `dashboard` starts a private cluster's dashboard too: its state API is how Ray Train's placement-group
    cleaner learns that the trial actor running a Train run is gone (a trial ASHA stopped), and frees the run's
    CPUs. Raises UserError for --join when no cluster answers.
    """
    import ray

    if ray.is_initialized():
        return
    from instune import ray_console, ray_waits

    log_file = ray_console.log_file_in(log_dir)
    ray_console.route_driver_logs(log_file, verbose=options.verbose)
    recorded, live = recorded_cluster()
    if os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
        if "://" not in address and address != "auto" and not answers(address):
            raise UserError(f"RAY_ADDRESS: no Ray cluster answers at {address}; unset it to start a private "
                            "cluster, or point it at a running one")
        ray.init(address=address, log_to_driver=True)
        line = f"[ray] joined the Ray cluster at {address} (RAY_ADDRESS)"
        private = False
    elif options.join:
        if not live:
            what = f"{current_cluster_file()} names {recorded}, where none answers" if recorded else \
                f"{current_cluster_file()} does not exist"
            raise UserError(f"--join: no Ray cluster runs on this machine ({what}); start one with "
                            "`ray start --head`, or leave out --join to start a private one")
        _set_env("RAY_ADDRESS", recorded)
        ray.init(address=recorded, log_to_driver=True, runtime_env={"env_vars": {"RAY_ADDRESS": recorded}})
        line = f"[ray] joined the Ray cluster at {recorded} (--join; without it a command starts a private one)"
        private = False
    else:
        if recorded and not live:
            print(f"[ray] ignoring {current_cluster_file()}: it names {recorded}, where no Ray cluster answers "
                  "(left behind by one that is gone)", flush=True)
        num_cpus = cpus_for(scaling)
        address = start_private(num_cpus, dashboard)
        beside = f", beside the one at {recorded} (--join runs there instead)" if live else ""
        line = f"[ray] started a private Ray cluster at {address} with {num_cpus} CPUs{beside}"
        private = True
    ray_console.route_worker_output(verbose=options.verbose)
    print(f"{line}; Ray's logs: {log_file or ray_console.session_logs()}", flush=True)
    wait_s = scaling.resource_wait_s if scaling is not None else None
    if wait_s:
        ray_waits.watch(wait_s, end_run=private)


def start_private(num_cpus: int, dashboard: bool) -> str:
    """Start a cluster of this process's own, whose address is in RAY_ADDRESS for this process and every
    process Ray starts; returns the address."""
    import ray

    port = unused_port()
    address = f"{ray.util.get_node_ip_address()}:{port}"  # the host Ray's GCS advertises
    # Ray's processes inherit this environment: its workers then look this cluster up, not another.
    _set_env("RAY_ADDRESS", address)
    _set_env("RAY_GCS_SERVER_PORT", str(port))
    _set_env(PREEMPTION_WATCHER_ENV, os.environ.get(PREEMPTION_WATCHER_ENV, "0"))
    try:
        # address "local": a new cluster even when RAY_ADDRESS is set (ray.init reads it only for None/"auto").
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard,
                 dashboard_port=unused_port() if dashboard else None, log_to_driver=True)
    finally:
        # Only the head reads it; a second cluster started by this process later must pick its own port.
        os.environ.pop("RAY_GCS_SERVER_PORT", None)
    gcs_address = ray.get_runtime_context().gcs_address
    if gcs_address != address:
        # Ray's processes were started with RAY_ADDRESS naming `address`: they would look up another cluster
        # (or none), so Train's cleaner and the state API would be wrong. Not a state to run in.
        ray.shutdown()
        raise RuntimeError(f"Ray started this command's cluster at {gcs_address}, not at {address}, the address "
                           "its processes were given (was the port taken meanwhile?); run the command again")
    return address


def stop_ray() -> None:
    """Shut Ray down and restore the environment start_ray changed."""
    import ray

    from instune import ray_console, ray_waits

    ray_waits.stop()
    ray.shutdown()
    ray_console.restore()
    for name, value in _saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _saved_env.clear()
