"""The cluster tests' tiny quickstart: one in-domain and one out-of-domain task, a micro model, two steps."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def unused_port() -> int:
    """A TCP port nothing listens on now; other people's Ray clusters run on this machine, so never a default."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port():
    return unused_port


def tiny_quickstart(output_dir: Path, *, placement_strategy: str = "PACK", max_steps: int = 2) -> dict:
    """The quickstart made tiny: 30 tasks in each of two formats, hidden size 32, LoRA r 4, 3 eval examples."""
    return {
        "name": "tiny",
        "output_dir": str(output_dir),
        "model": {"max_length": 64,
                  "embedded": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
                               "vocab_size": 320, "max_position_embeddings": 64}},
        "data": {"corpus": {"dir": "${output_dir}/corpus", "in_domain": ["arithmetic"],
                            "out_of_domain": ["unit_conversion"], "train_per_domain": 30, "eval_per_domain": 3},
                 "sources": [{"name": "tasks", "path": "${output_dir}/corpus/train/alpaca.jsonl", "format": "alpaca"},
                             {"name": "chats", "path": "${output_dir}/corpus/train/sharegpt.jsonl",
                              "format": "sharegpt"}]},
        "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"lr": 1e-3, "max_steps": max_steps, "micro_batch_size": 2, "log_every": 1},
        "scaling": {"num_workers": 2, "placement_strategy": placement_strategy},
        "eval": {"max_new_tokens": 4, "max_examples": 3, "batch_size": 4,
                 "sets": [{"name": "arithmetic", "domain": "arithmetic", "kind": "in_domain",
                           "path": "${output_dir}/corpus/eval/arithmetic.jsonl"}]},
    }


@pytest.fixture
def tiny_config_file(tmp_path):
    """Write `tiny_quickstart(...)` to tmp_path/tiny.yaml; returns a function taking its keyword arguments."""

    def write(output_dir: Path, **options) -> Path:
        path = tmp_path / "tiny.yaml"
        path.write_text(yaml.safe_dump(tiny_quickstart(output_dir, **options), sort_keys=False))
        return path

    return write


@pytest.fixture
def tiny_config(tiny_config_file):
    """Load the tiny quickstart as the CLI does; returns a function (output_dir, overrides=(), **options)."""
    from instune.config import load_config

    def load(output_dir: Path, overrides=(), **options):
        return load_config(tiny_config_file(output_dir, **options), list(overrides))

    return load
