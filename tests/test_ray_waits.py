"""A placement group waiting on resources another group holds is found, and named, within the bound."""

from __future__ import annotations

import time

import pytest

from instune import ray_waits


@pytest.fixture(scope="module")
def two_cpu_cluster(local_ray_cluster):
    with local_ray_cluster(num_cpus=2, log_to_driver=False):
        yield


@pytest.fixture
def blocked(two_cpu_cluster):
    """(holder, waiter): a group holding both CPUs, made by this driver, and one waiting for a CPU."""
    from ray.util.placement_group import placement_group, remove_placement_group

    holder = placement_group([{"CPU": 1}, {"CPU": 1}])
    holder.wait(timeout_seconds=60)
    waiter = placement_group([{"CPU": 1}])
    yield holder, waiter
    remove_placement_group(waiter)
    remove_placement_group(holder)
    ray_waits.stop()


def test_the_table_shows_who_holds_and_who_waits(blocked):
    holder, waiter = blocked
    time.sleep(1)
    groups = {g.id: g for g in ray_waits.placement_groups()}
    held, waiting = groups[holder.id.hex()[:8]], groups[waiter.id.hex()[:8]]
    assert (held.state, held.resources["CPU"]) == ("CREATED", 2.0)
    assert (waiting.state, waiting.resources["CPU"]) == ("PENDING", 1.0)
    assert held.creator.startswith("job ") and not held.creator.endswith("(ended)")

    assert ray_waits.stuck_line(list(groups.values()), {waiting.id: 100.0}, 399.0, 300) is None
    line = ray_waits.stuck_line(list(groups.values()), {waiting.id: 100.0}, 400.0, 300)
    assert line == (f"placement group {waiting.id} of {waiting.creator} has waited 300 s for 1 CPU "
                    f"(scaling.resource_wait_s: 300) held by: placement group {held.id} (2 CPU) of {held.creator}")


def test_a_wait_past_the_bound_ends_the_run_with_the_line(blocked, monkeypatch, capsys):
    holder, waiter = blocked
    monkeypatch.setattr(ray_waits, "CHECK_EVERY_S", 0.2)
    started = time.monotonic()
    ray_waits.watch(2.0, end_run=True)
    with pytest.raises(KeyboardInterrupt):
        while time.monotonic() - started < 60:
            time.sleep(0.05)
    assert 2.0 <= time.monotonic() - started < 30
    line = ray_waits.stuck()
    assert line.startswith(f"placement group {waiter.id.hex()[:8]} ") and f"{holder.id.hex()[:8]} (2 CPU)" in line
    assert capsys.readouterr().err == f"instune: error: {line}\n"


def test_nothing_is_reported_while_groups_get_placed(two_cpu_cluster, monkeypatch, capsys):
    from ray.util.placement_group import placement_group, remove_placement_group

    monkeypatch.setattr(ray_waits, "CHECK_EVERY_S", 0.2)
    ray_waits.watch(1.0, end_run=True)
    try:
        for _ in range(4):  # each group waits a moment for the one before to be removed, never the bound
            group = placement_group([{"CPU": 2}])
            group.wait(timeout_seconds=30)
            time.sleep(0.6)
            remove_placement_group(group)
        time.sleep(1.5)
        assert ray_waits.stuck() is None and capsys.readouterr().err == ""
    finally:
        ray_waits.stop()


def test_on_a_joined_cluster_the_wait_is_a_warning_and_the_run_goes_on(blocked, monkeypatch, capsys):
    # Others' jobs may still free the resources: the run is not ended, and the CLI must not exit 3 for it.
    holder, waiter = blocked
    monkeypatch.setattr(ray_waits, "CHECK_EVERY_S", 0.2)
    ray_waits.watch(1.0, end_run=False)
    started = time.monotonic()
    while "warning" not in (err := capsys.readouterr().err) and time.monotonic() - started < 30:
        time.sleep(0.1)
    assert err.startswith(f"[ray] warning: placement group {waiter.id.hex()[:8]} ")
    assert ray_waits.stuck() is None
