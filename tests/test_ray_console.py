"""The console of a stage run through the CLI: instune's lines only; Ray's own output in OUTPUT_DIR/logs."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def tiny_prepare_config(tmp_path: Path) -> Path:
    """The embedded corpus made tiny: 40 tasks of one domain in each of two formats."""
    out = tmp_path / "out"
    tree = {"name": "console", "output_dir": str(out),
            "model": {"max_length": 64, "embedded": {"hidden_size": 32, "num_layers": 1, "num_heads": 2,
                                                     "intermediate_size": 64, "vocab_size": 320,
                                                     "max_position_embeddings": 64}},
            "data": {"corpus": {"dir": str(tmp_path / "corpus"), "in_domain": ["arithmetic"],
                                "out_of_domain": ["unit_conversion"], "train_per_domain": 40,
                                "eval_per_domain": 3},
                     "sources": [{"name": "tasks", "path": f"{tmp_path}/corpus/train/alpaca.jsonl",
                                  "format": "alpaca"},
                                 {"name": "chats", "path": f"{tmp_path}/corpus/train/sharegpt.jsonl",
                                  "format": "sharegpt"}]},
            "scaling": {"num_workers": 1}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.slow  # one prepare through the CLI: a Ray cluster's start and three Ray Data jobs (~30 s)
def test_prepare_prints_instune_lines_and_leaves_ray_output_in_the_log_file(tmp_path):
    result = subprocess.run([sys.executable, "-m", "instune.cli", "prepare", str(tiny_prepare_config(tmp_path))],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout.splitlines() + result.stderr.splitlines()
    lines = [line for line in console if line.startswith(("[ray] ", "[prepare] "))]
    # One line per step of the stage: Ray's start, phase 1 and its steps, phase 2, the output, each source.
    assert len(lines) <= 10, lines
    assert lines[0].startswith("[ray] started a private Ray cluster") and \
        lines[0].endswith(f"Ray's logs: {tmp_path / 'out' / 'logs' / 'ray.log'}")
    assert any("records/s" in line for line in lines if line.startswith("[prepare] phase 1")), lines
    # Besides them, at most three lines of other libraries (DeepSpeed's accelerator note, transformers' bar
    # writing the embedded model, drawn twice in a pipe), and none of Ray's.
    others = [line for line in console if line.strip() and line not in lines]
    assert len(others) <= 3 and not any("ray" in line.lower() for line in others), others
    # Ray's own lines (its start, Ray Data's execution plans) are in the log file.
    log = (tmp_path / "out" / "logs" / "ray.log").read_text()
    assert "Started a local Ray instance" in log and "Execution plan of Dataset" in log


def test_instune_lines_printed_in_workers_reach_the_console_and_rays_do_not():
    from instune.ray_console import INSTUNE_LINE

    shown = ["[train] step 10/300 loss 2.1", "[sweep] trial 3 done",
             "instune: model.kernels: auto uses PyTorch's kernels and the chunked loss on cpu"]
    hidden = ["Reporting training result 1", "2026-12-07 INFO worker.py:1 -- Started", "[Ray] note",
              "instune-resource-waits started", "Failed to stop PlacementGroupCleaner gracefully"]
    assert [line for line in shown + hidden if INSTUNE_LINE.match(line)] == shown
