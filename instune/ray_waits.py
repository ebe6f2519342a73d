"""Waits for cluster resources that cannot come end in one line, instead of a run that hangs.

A Train run (alone or in a sweep's trial) asks for its workers' CPUs and GPUs as a placement group, and waits
for it without a limit. When the resources are held by placement groups nobody will remove (a stopped trial's
run whose cleanup never happened, issue 20), nothing moves again. A watcher thread in the driver reads the
placement-group table from the GCS every few seconds; when a group has been pending longer than
`scaling.resource_wait_s` while the set of created groups stayed the same, it names the groups holding the
cluster's resources and who created them. On a private cluster (nothing else can free them) it ends the run:
the line goes to stderr, the main thread gets KeyboardInterrupt, and the CLI exits 3 with the line. On a
joined cluster others' jobs may still finish, so it prints the line once and lets the wait go on.
Tasks and actors outside placement groups are not watched: Ray Data and Tune size those to the cluster.
"""

from __future__ import annotations

import _thread
import sys
import threading
import time
from dataclasses import dataclass

CHECK_EVERY_S = 5.0

_watch: dict = {"stop": None, "stuck": None}


@dataclass
class Group:
    """One row of Ray's placement-group table, as the watcher needs it."""

    id: str
    state: str  # PENDING, PREPARED, CREATED, REMOVED, RESCHEDULING
    resources: dict[str, float]  # summed over its bundles
    creator: str  # "actor TrainController 1a2b3c4d (dead)", "job 01000000"


def placement_groups() -> list[Group]:
    """The cluster's placement groups, from the GCS. ray.util.placement_group_table reads the same table but
    leaves out who created each group; the state API would need the dashboard."""
    import ray._private.state
    from ray.core.generated import gcs_pb2

    state = ray._private.state.state
    groups = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        data = gcs_pb2.PlacementGroupTableData.FromString(raw)
        resources: dict[str, float] = {}
        for bundle in data.bundles:
            for name, amount in bundle.unit_resources.items():
                resources[name] = resources.get(name, 0.0) + amount
        actor_id = data.creator_actor_id.hex()
        if actor_id.strip("f"):  # empty or nil: a driver created it
            actor = state.actor_table(actor_id) or {}
            dead = data.creator_actor_dead or actor.get("State") == "DEAD"
            creator = f"actor {actor.get('ActorClassName', '?')} {actor_id[:8]}{' (dead)' if dead else ''}"
        else:
            creator = f"job {data.creator_job_id.hex()}{' (ended)' if data.creator_job_dead else ''}"
        groups.append(Group(data.placement_group_id.hex()[:8],
                            gcs_pb2.PlacementGroupTableData.PlacementGroupState.Name(data.state), resources,
                            creator))
    return groups


def amounts(resources: dict[str, float]) -> str:
    """{"CPU": 2.0, "memory": 1.0} -> "2 CPU, 1 memory" (Ray's per-bundle internals left out)."""
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items()) if "_group_" not in k)


def stuck_line(groups: list[Group], pending_since: dict[str, float], now: float, wait_s: float) -> str | None:
    """The line for a group pending longer than `wait_s` (per `pending_since`, id -> first seen pending),
    naming the created groups that hold resources; None while no wait is that long."""
    waiting = [g for g in groups if g.state in ("PENDING", "RESCHEDULING") and
               now - pending_since.get(g.id, now) >= wait_s]
    if not waiting:
        return None
    first = waiting[0]
    holders = [g for g in groups if g.state == "CREATED"]
    held = "; ".join(f"placement group {g.id} ({amounts(g.resources)}) of {g.creator}" for g in holders) or \
        "no placement group (tasks or actors outside placement groups, or resources the cluster lacks)"
    return (f"placement group {first.id} of {first.creator} has waited {now - pending_since[first.id]:.0f} s "
            f"for {amounts(first.resources)} (scaling.resource_wait_s: {wait_s:g}) held by: {held}")


def watch(wait_s: float, end_run: bool) -> None:
    """Start the watcher thread (one per process)."""
    if _watch["stop"] is not None:
        return
    stop = threading.Event()
    _watch.update(stop=stop, stuck=None)
    threading.Thread(target=_loop, args=(wait_s, end_run, stop), name="instune-resource-waits",
                     daemon=True).start()


def _loop(wait_s: float, end_run: bool, stop: threading.Event) -> None:
    pending_since: dict[str, float] = {}
    created: frozenset = frozenset()
    while not stop.wait(CHECK_EVERY_S):
        try:
            groups = placement_groups()
        except Exception as e:
            import ray

            if ray.is_initialized():  # else the run is over and Ray shut down: nothing left to watch
                print(f"[ray] stopped watching resource waits: {type(e).__name__}: {e}", file=sys.stderr)
            return
        now = time.monotonic()
        now_created = frozenset(g.id for g in groups if g.state == "CREATED")
        if now_created != created:  # something was placed or freed: every wait starts over
            created, pending_since = now_created, {}
        pending_since = {g.id: pending_since.get(g.id, now) for g in groups
                         if g.state in ("PENDING", "RESCHEDULING")}
        line = stuck_line(groups, pending_since, now, wait_s)
        if line is None:
            continue
        if end_run:
            _watch["stuck"] = line  # only a wait that ends the run: the CLI exits 3 for it
        print(f"instune: error: {line}" if end_run else f"[ray] warning: {line}", file=sys.stderr, flush=True)
        if end_run:
            _thread.interrupt_main()
        return


def stuck() -> str | None:
    """The line of a wait that ended the run, if one did."""
    return _watch["stuck"]


def stop() -> None:
    if _watch["stop"] is not None:
        _watch["stop"].set()
    _watch.update(stop=None, stuck=None)
