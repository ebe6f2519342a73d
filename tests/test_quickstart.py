"""The quickstart end to end through the real CLI: Ray Data, Ray Train (2 workers, LoRA), eval before/after."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_lowers_in_domain_loss_and_writes_outputs(tmp_path):
    out = tmp_path / "qs"
    result = subprocess.run(
        [sys.executable, "-m", "instune.cli", "run", str(ROOT / "configs/quickstart.yaml"),
         # 20 steps and 6 examples a set: the in-domain drops were 4.3, 5.0 and 2.3 against the 1.0 required
         # (5.1, 5.6 and 3.0 at 40 steps and 12 examples, for twice the training and eval time).
         "--set", f"output_dir={out}", "--set", "train.max_steps=20", "--set", "train.log_every=5",
         "--set", "data.corpus.train_per_domain=300", "--set", "data.corpus.eval_per_domain=6",
         "--set", "eval.max_new_tokens=6"],
        capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]

    before = {r["name"]: r for r in json.loads((out / "eval/base.json").read_text())}
    after = {r["name"]: r for r in json.loads((out / "eval/tuned.json").read_text())}
    in_domain = [n for n, r in before.items() if r["kind"] == "in_domain"]
    assert len(in_domain) == 3 and len(before) == 5
    for name in in_domain:
        assert after[name]["loss"] < before[name]["loss"] - 1.0, (name, before[name], after[name])

    metrics = [json.loads(line) for line in (out / "train/run/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [5, 10, 15, 20]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert all(m["tokens_per_second"] > 0 for m in metrics)

    manifest = json.loads((out / "data/manifest.json").read_text())
    for counts in manifest["sources"].values():
        assert counts["read"] == counts["kept"] + counts["rejected"] > 0
    assert (out / "resolved_config.yaml").is_file()
    assert (out / "adapter/adapter_config.json").is_file()
    assert (out / "merged/config.json").is_file() and list((out / "merged").glob("*.safetensors"))
    table = (out / "eval/before_after.md").read_text()
    assert "| in-domain mean |" in table and "| out-of-domain mean |" in table
    assert "exact match before" in result.stdout and str(out / "merged") in result.stdout
    assert not [p for p in out.rglob(".*partial*")]
