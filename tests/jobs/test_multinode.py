"""Several Ray nodes on one machine (ray.cluster_utils.Cluster): training spreads its workers over nodes,
checkpoints to storage every node shares, and resumes on other nodes after the first ones are gone."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import ray


@pytest.fixture
def three_node_cluster(monkeypatch, free_port):
    """A CPU-less head (like the manifests' head) and three 2-CPU worker nodes; yields the Cluster."""
    from ray.cluster_utils import Cluster

    gcs_port = free_port()
    # Ray Train's placement-group cleaner finds its cluster by address; other clusters run on this machine.
    monkeypatch.setenv("RAY_ADDRESS", f"{ray.util.get_node_ip_address()}:{gcs_port}")
    # Short: Ray puts Unix sockets under temp_dir, and their paths must stay under 108 bytes.
    temp_dir = tempfile.mkdtemp(prefix="instune-nodes-", dir="/tmp")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "gcs_server_port": gcs_port, "temp_dir": temp_dir, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": free_port(), "dashboard_agent_listen_port": free_port()})
    try:
        for _ in range(3):
            cluster.add_node(num_cpus=2)
        ray.init(address=cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def train_worker_nodes() -> dict[str, str]:
    """Actor id -> node id of every Ray Train worker this cluster has run, from Ray's state API."""
    from ray.util.state import list_actors

    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=10_000)
    return {w.actor_id: w.node_id for w in workers}


def checkpoint_dirs(run_dir: Path) -> list[str]:
    """Ray Train's checkpoint directories in the run's storage, oldest first (their names hold the time)."""
    return sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())


@pytest.mark.slow
def test_workers_spread_over_nodes_and_resume_on_other_nodes(three_node_cluster, tiny_config, tmp_path):
    from instune import stages

    cluster = three_node_cluster
    shared = tmp_path / "shared" / "tiny"  # every "node" of this cluster sees this directory
    config = tiny_config(shared, placement_strategy="STRICT_SPREAD", max_steps=2)
    stages.prepare_stage(config)
    first = stages.train_stage(config)

    first_workers = train_worker_nodes()
    first_nodes = set(first_workers.values())
    assert len(first_workers) == 2 and len(first_nodes) == 2, "STRICT_SPREAD puts each worker on its own node"
    assert cluster.head_node.node_id not in first_nodes, "the head has no CPUs for workers"
    run_dir = shared / "train" / "run"
    first_checkpoints = checkpoint_dirs(run_dir)
    assert len(first_checkpoints) == 1 and first.final_metrics["step"] == 2

    # Lose both nodes that trained (rank 0's among them) and bring up a new one: the run must go on elsewhere.
    for node in list(cluster.worker_nodes):
        if node.node_id in first_nodes:
            cluster.remove_node(node)
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()

    resumed = stages.train_stage(tiny_config(shared, placement_strategy="STRICT_SPREAD", max_steps=4))

    second_workers = {a: n for a, n in train_worker_nodes().items() if a not in first_workers}
    second_nodes = set(second_workers.values())
    assert len(second_workers) == 2 and len(second_nodes) == 2
    assert not second_nodes & first_nodes
    # The second run started from the step-2 checkpoint on shared storage: it reported steps 3 and 4 only.
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4]
    checkpoints = checkpoint_dirs(run_dir)
    assert len(checkpoints) == 2 and checkpoints[0] == first_checkpoints[0]
    assert resumed.final_metrics["step"] == 4
    assert list(Path(resumed.adapter_dir).glob("*.safetensors"))
