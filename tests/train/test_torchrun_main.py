"""The loop without Ray: `torchrun --nproc_per_node 2 -m instune.train.torchrun_main` on CPU (gloo). A worker
dies mid-run; started again on the same output directory, the run resumes from the latest checkpoint."""

from __future__ import annotations

import json

import pytest
from .train_helpers import read_metrics, run_torchrun, write_packed_rows

from instune.errors import UserError
from instune.train.loop import CRASH_MARKER_ENV, LoopSettings
from instune.train.methods import MethodSettings
from instune.train.torchrun_main import main


@pytest.mark.slow
def test_torchrun_trains_and_a_rerun_resumes_after_a_worker_died(tiny_model, tmp_path):
    rows = write_packed_rows(tmp_path / "train", 48, vocab=20, seed=1)
    validation = write_packed_rows(tmp_path / "validation", 8, vocab=20, seed=2)
    marker = tmp_path / "crash_at_step"
    marker.write_text("6")  # the last worker dies as step 6 starts; step 4 has the latest checkpoint
    settings = LoopSettings(model_path=str(tiny_model), total_steps=8, micro_batch_size=2, log_every=1,
                            eval_every=2, checkpoint_every=2, lr=3e-2, warmup_ratio=0, method=MethodSettings(
                                method="lora", r=4, dropout=0.0, modules_to_save=["lm_head"]))
    output = tmp_path / "out"
    run_torchrun(settings, rows, output, 2, validation_dir=validation, env={CRASH_MARKER_ENV: str(marker)},
                 expect_failure=True)
    assert [m["step"] for m in read_metrics(output)] == [1, 2, 3, 4, 5]
    run_torchrun(settings, rows, output, 2, validation_dir=validation)  # again, on the same output

    assert not marker.exists()
    metrics = read_metrics(output)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 5, 6, 7, 8]  # step 5 ran again after the resume
    first, before, after = metrics[0]["loss"], metrics[4]["loss"], metrics[5]["loss"]
    assert first - before > 0.5
    # Same weights, optimizer, data position and RNG as the first time: the same step 5.
    assert after == pytest.approx(before, rel=1e-6)
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert len(evals) == 4 and evals[-1] < evals[0] - 0.5  # at every checkpoint (2, 4, 6, 8), and falling
    checkpoints = sorted(p.name for p in (output / "checkpoints").iterdir())
    assert checkpoints == ["step-00000006", "step-00000008"]  # the newest two, no partial ones
    state = json.loads((output / "checkpoints/step-00000008/trainer_state.json").read_text())
    assert state == {"step": 8, "micro_batches_done": 8, "world_size": 2}
    assert sorted(p.name for p in (output / "checkpoints/step-00000008/rng").iterdir()) == \
        ["rank-00000.json", "rank-00001.json"]


def test_missing_data_is_a_user_error(tmp_path):
    (tmp_path / "settings.json").write_text(json.dumps(LoopSettings(model_path="m", total_steps=1).to_dict()))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="--train-data: no \\*.parquet files under"):
        main(["--settings", str(tmp_path / "settings.json"), "--train-data", str(tmp_path / "empty"),
              "--output", str(tmp_path / "out")])
