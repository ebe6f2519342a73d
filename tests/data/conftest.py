"""A local Ray cluster for the data tests, one for the whole tests/data package."""

from __future__ import annotations

import pytest
import ray
import ray.data


@pytest.fixture(scope="package")
def local_ray():
    # One cluster for every test under tests/data (its workers, once started, serve them all), shut down
    # before the other directories start their own.
    # Logical CPUs: enough for the tokenizer actor and read tasks of prepare to run side by side.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
