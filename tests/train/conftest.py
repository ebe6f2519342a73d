"""Fixtures for the training tests: a tiny model and packed rows, written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from .train_helpers import write_packed_rows, write_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def packed_rows(tmp_path_factory) -> Path:
    return write_packed_rows(tmp_path_factory.mktemp("rows") / "train", 64)
