"""Fixtures every test directory shares: a private local Ray cluster (`local_ray_cluster`), and a real S3
endpoint for the tests of cloud outputs (moto's server on 127.0.0.1, in this process)."""

from __future__ import annotations

import contextlib
import os
import signal
import uuid

import pytest


@contextlib.contextmanager
def _local_ray(**init_kwargs):
    import ray
    import ray.data

    from instune.ray_runtime import PREEMPTION_WATCHER_ENV, unused_port

    # As instune's start_ray does (instune/ray_runtime.py): the cluster's address is chosen first and put in
    # RAY_ADDRESS, which Ray's processes inherit, so what looks a cluster up without an address (Ray Train's
    # placement-group cleaner, through the state API) finds this one and not another test run's on this machine.
    # And as it does, no Ray Train preemption watcher on a cluster of one machine (its process is CPU taken
    # from every Train run's start).
    port = unused_port()
    saved = {name: os.environ.get(name) for name in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT", PREEMPTION_WATCHER_ENV)}
    os.environ.update(RAY_ADDRESS=f"{ray.util.get_node_ip_address()}:{port}", RAY_GCS_SERVER_PORT=str(port))
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    try:
        # address "local": our own cluster even when RAY_ADDRESS or a `ray start` cluster names another.
        ray.init(**{"address": "local", "num_cpus": 4, "include_dashboard": False, **init_kwargs})
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT", None)  # only the head reads it
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(autouse=True)
def _no_ray_address_leaks():
    """A test that ran a command in this process without a cluster fixture leaves the private cluster start_ray
    made, with its address exported in RAY_ADDRESS; end it here, so no later test inherits (or has its
    subprocesses join) a cluster that the next fixture's shutdown makes a dead address."""
    before = os.environ.get("RAY_ADDRESS")
    # Ray Train's fit() installs a SIGINT handler that aborts its controller and leaves it installed; a later
    # test's KeyboardInterrupt (ray_waits ends a stuck run with one) would call it on a controller long gone.
    # Each test starts with Python's own handler, whatever a fixture's training left installed.
    sigint_before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, sigint_before)
    if os.environ.get("RAY_ADDRESS") != before:
        from instune.ray_runtime import stop_ray

        stop_ray()
        assert os.environ.get("RAY_ADDRESS") == before, "stop_ray did not restore RAY_ADDRESS"


@pytest.fixture(scope="session")
def local_ray_cluster():
    """A function: ray.init keyword arguments (defaults: 4 logical CPUs, no dashboard) -> a context manager that
    runs a private local Ray cluster, with its address in RAY_ADDRESS, and shuts it down. Module- and
    package-scoped fixtures use it, so a test directory shares one cluster and the next directory starts its own:

        @pytest.fixture(scope="module")
        def ray_cluster(local_ray_cluster):
            with local_ray_cluster(num_cpus=2):
                yield
    """
    return _local_ray

# Fake credentials: moto accepts any. No instance-metadata lookups (nothing answers them here).
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="session")
def s3_endpoint():
    """host:port of an S3 server for the session; its credentials are in os.environ while it runs, so Ray
    processes started after it inherit them."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"{host}:{port}"
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_uri(s3_endpoint):
    """A function: path inside a new empty bucket -> its s3:// URI, with the endpoint as pyarrow's options."""
    import boto3

    bucket = f"instune-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=f"http://{s3_endpoint}").create_bucket(Bucket=bucket)

    def uri(path: str = "") -> str:
        return f"s3://{bucket}/{path.strip('/')}?endpoint_override={s3_endpoint}&scheme=http"

    return uri


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The embedded Llama made tiny (2 layers, hidden 32, vocabulary 400) with its ChatML tokenizer, built once
    for the session as base_model builds the default: the one small model the data, eval and model-source
    tests share."""
    from instune.base_model import tokenizer_training_texts
    from instune.default.model import ensure_embedded_model

    return ensure_embedded_model(
        tmp_path_factory.mktemp("tiny_model") / "m", tokenizer_training_texts(per_domain=30), vocab_size=400,
        hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=256, seed=0)
