"""Fixtures for the training tests: a tiny model and packed rows, written once per session, and the one
torchrun launch that trains the 2-worker runs several slow tests check (two_worker_runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
from .train_helpers import TWO_WORKER_PLANS, run_many, write_packed_rows, write_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def packed_rows(tmp_path_factory) -> Path:
    return write_packed_rows(tmp_path_factory.mktemp("rows") / "train", 64)


@pytest.fixture(scope="session")
def two_worker_runs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """Every plan of TWO_WORKER_PLANS (train_helpers.py) trained in one torchrun launch of 2 workers, on the
    session's tiny model; returns each plan's directory by name."""
    root = tmp_path_factory.mktemp("two_worker_runs")
    runs = [run for name, plan in TWO_WORKER_PLANS.items() for run in plan(tiny_model, root / name)]
    # Only slow tests ask for it, so `-m "not slow"` starts no launch; a failed run fails each of them.
    run_many(runs, root, nproc=2, timeout=900)
    return {name: root / name for name in TWO_WORKER_PLANS}
