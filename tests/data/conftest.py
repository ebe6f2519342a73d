"""A local Ray cluster for the data tests, one for the whole tests/data package."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="package")
def local_ray(local_ray_cluster):
    # One cluster for every test under tests/data (its workers, once started, serve them all), shut down
    # before the other directories start their own.
    # Logical CPUs: enough for the tokenizer actor and read tasks of prepare to run side by side.
    with local_ray_cluster(num_cpus=4, log_to_driver=False):
        yield


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    """A tiny embedded LLaVA-style model directory (instune/default/vlm.py), built once for the session."""
    from instune.config import VlmEmbeddedConfig
    from instune.default.vlm import ensure_embedded_vlm

    settings = VlmEmbeddedConfig(vision_hidden_size=32, hidden_size=64, num_layers=1, num_heads=2,
                                 intermediate_size=128, vocab_size=320)
    texts = ["How many shapes are in the picture? 3", "What colour is the shape? red", "the digit 7"]
    return ensure_embedded_vlm(tmp_path_factory.mktemp("vlm") / "model", texts, settings)


@pytest.fixture(scope="session")
def model_dir(tiny_model_dir) -> str:
    """The shared tiny model (tests/conftest.py) as the path string prepare and the scorers take."""
    return str(tiny_model_dir)
