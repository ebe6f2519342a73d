"""A local Ray cluster for the data tests, one per test module."""

from __future__ import annotations

import pytest
import ray
import ray.data


@pytest.fixture(scope="module")
def local_ray():
    # Logical CPUs: enough for the tokenizer actor and read tasks of prepare to run side by side.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
