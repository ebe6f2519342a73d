"""The CLI prints user mistakes as one line and exits 2, before Ray starts; no traceback."""

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "instune.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("instune: error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_bad_config_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "output_dir": str(tmp_path), "data": {"sources": []}}))
    assert_one_line_error(run_cli("prepare", str(path)), "data.sources", "c.yaml")


def test_missing_source_file_is_named_before_ray_starts(tmp_path):
    path = tmp_path / "c.yaml"
    missing = tmp_path / "nowhere.jsonl"
    path.write_text(yaml.safe_dump({"name": "t", "output_dir": str(tmp_path / "out"),
                                    "data": {"sources": [{"name": "s1", "path": str(missing)}]}}))
    result = run_cli("prepare", str(path))
    assert_one_line_error(result, "s1", str(missing))
    assert not (tmp_path / "out" / "data").exists()


def test_model_path_that_is_not_a_model(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "hi", "output": "hello"}\n')
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "output_dir": str(tmp_path / "out"),
                                    "model": {"path": str(tmp_path)},
                                    "data": {"sources": [{"name": "s", "path": str(data)}]}}))
    assert_one_line_error(run_cli("prepare", str(path)), "model.path", "config.json")


def test_override_error(tmp_path):
    assert_one_line_error(run_cli("run", str(ROOT / "configs/quickstart.yaml"), "--set", "train.lr=abc"),
                          "train.lr")


def test_vlm_config_errors_are_one_line_before_ray_starts(tmp_path):
    # `python -m instune vlm` is what a Ray job runs (instune/ray_jobs.py); `instune vlm` is the same main.
    result = subprocess.run([sys.executable, "-m", "instune", "vlm", str(ROOT / "configs/vlm_quickstart.yaml"),
                             "--set", f"output_dir={tmp_path}", "--set", "model.embedded.image_size=30"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert_one_line_error(result, "model.embedded", "image_size 30 is not a multiple of patch_size 8")
    path = tmp_path / "c.yaml"
    missing = tmp_path / "nowhere.json"
    source = {"name": "pics", "path": str(missing)}
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"),
                                    "data": {"sources": [source], "eval_sources": [source]}}))
    assert_one_line_error(run_cli("vlm", str(path)), "pics", str(missing))
    assert_one_line_error(run_cli("vlm", str(path), "--set", "output_dir=s3://bucket/vlm"),
                          "output_dir: s3://bucket/vlm is a URI; instune vlm writes to a local or mounted path")
    assert not (tmp_path / "out" / "data").exists() and not (tmp_path / "out" / "logs").exists()
