"""Training through Ray Train: a worker killed mid-run is replaced and the run resumes from its latest
checkpoint (text, preference pairs, and the vision-language run's train step); a run started again on the same
directory continues; metrics reach metrics.jsonl and TensorBoard; a run the cluster cannot place is refused
before any worker starts."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from .train_helpers import write_packed_rows
from .test_vlm_training import vlm_rows  # noqa: F401  (the fixture: a tiny VLM and 16 image-text rows)

from instune.errors import UserError
from instune.stages import read_split
from instune.train.loop import CRASH_MARKER_ENV, LoopSettings
from instune.train.methods import MethodSettings
from instune.train.trainer import (DEFAULT_POLL_INTERVAL_S, POLL_INTERVAL_ENV, TENSORBOARD_DIR, export_model,
                                   run_ray_training)


@pytest.fixture(scope="module")
def crash_marker(tmp_path_factory):
    return tmp_path_factory.mktemp("crash") / "crash_at_step"


@pytest.fixture(scope="module")
def ray_cluster(local_ray_cluster, crash_marker):
    with local_ray_cluster(runtime_env={"env_vars": {CRASH_MARKER_ENV: str(crash_marker)}}):
        yield


def scalar_tags(event_dir) -> set[str]:
    """Tags of the scalars in TensorBoard event files (TFRecord framing around Event protos)."""
    from tensorboardX.proto.event_pb2 import Event

    tags = set()
    for path in event_dir.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            tags.update(v.tag for v in event.summary.value)
            offset += 12 + length + 4
    return tags


def settings_for(model, total_steps: int, **kw) -> LoopSettings:
    # The head trains too, so the loss falls fast on rows drawn from a 17-token vocabulary.
    return LoopSettings(model_path=str(model), total_steps=total_steps, micro_batch_size=2, log_every=1,
                        eval_every=2, checkpoint_every=2, lr=5e-2, warmup_ratio=0,
                        method=MethodSettings(method="lora", r=4, dropout=0.0, modules_to_save=["lm_head"]), **kw)


# DeepSpeed here (its per-worker optimizer shards merge into one checkpoint); DDP resume is tested
# under torchrun in test_torchrun_main.py.
ZERO_2 = dict(strategy="deepspeed", zero_stage=2)


def train(settings, rows, storage, **kw):
    # Read as `instune train` reads prepared splits: small ones go into the object store, so an eval does not
    # start a read job (6-11 s on 2 CPUs) every time.
    datasets = {"train": read_split(rows / "train"), "validation": read_split(rows / "validation")}
    return run_ray_training(settings, datasets, num_workers=2, use_gpu=False, cpus_per_worker=1,
                            gpus_per_worker=0, placement_strategy="PACK", storage_dir=storage, run_name="run",
                            keep_checkpoints=2, **kw)


@pytest.mark.slow
def test_a_killed_deepspeed_worker_resumes_from_the_latest_checkpoint_and_a_rerun_continues(ray_cluster, crash_marker,
                                                                                  tiny_model, tmp_path):
    import json

    rows = tmp_path / "rows"
    write_packed_rows(rows / "train", 48, vocab=20, seed=1)
    write_packed_rows(rows / "validation", 8, vocab=20, seed=2)
    storage = tmp_path / "train"
    crash_marker.write_text("4")  # the last worker dies as step 4 starts; step 2 has the latest checkpoint

    result, metrics_file = train(settings_for(tiny_model, 6, **ZERO_2), rows, storage, max_failures=1)
    assert not crash_marker.exists()  # the crash happened
    # The controller polls (and so takes reports) ten times a second, not every 2 s: a loop that reports every
    # step is not held to one step per poll.
    assert os.environ[POLL_INTERVAL_ENV] == DEFAULT_POLL_INTERVAL_S
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 3, 4, 5, 6]  # step 3 ran again after the restart
    assert result.metrics["step"] == 6
    first, before, after = metrics[0]["loss"], metrics[2]["loss"], metrics[3]["loss"]
    assert first - before > 0.5  # the loss fell ...
    assert abs(after - before) < 0.2 * (first - before)  # ... and the restarted run went on from there
    assert all("eval_loss" in m for m in metrics if m["step"] % 2 == 0)
    assert {"loss", "lr", "grad_norm", "tokens_per_second", "peak_memory_mb", "eval_loss"} <= \
        scalar_tags(storage / "run" / TENSORBOARD_DIR)
    assert 1 <= len(list((storage / "run").glob("checkpoint_*"))) <= 3  # 2 best by eval_loss + the latest

    # Started again on the same directory with more steps: continues from step 6.
    result, _ = train(settings_for(tiny_model, 8, **ZERO_2), rows, storage)
    steps = [json.loads(line)["step"] for line in metrics_file.read_text().splitlines()]
    assert steps[7:] == [7, 8] and result.metrics["step"] == 8

    with result.checkpoint.as_directory() as checkpoint:
        adapter, merged = export_model(Path(checkpoint), str(tiny_model), str(tiny_model), "lora", tmp_path / "out")
    assert (adapter / "adapter_model.safetensors").is_file() and (merged / "model.safetensors").is_file()


def test_more_workers_than_the_cluster_has_is_refused_before_training(ray_cluster, tiny_model, tmp_path):
    refusal = r"scaling.num_workers: 9 workers x 1 CPU .* need 9 CPUs, but the Ray cluster has 4"
    with pytest.raises(UserError, match=refusal):
        run_ray_training(settings_for(tiny_model, 1), {}, num_workers=9, use_gpu=False, cpus_per_worker=1,
                         gpus_per_worker=0, placement_strategy="PACK", storage_dir=tmp_path, run_name="run")
    with pytest.raises(UserError, match="1 GPU"):
        run_ray_training(settings_for(tiny_model, 1), {}, num_workers=1, use_gpu=True, cpus_per_worker=1,
                         gpus_per_worker=1, placement_strategy="PACK", storage_dir=tmp_path, run_name="run")


def ray_pair_training(settings, train_dir, storage, **kw):
    """Two Ray Train workers on prepared pairs, read as `instune train` reads them."""
    return run_ray_training(settings, {"train": read_split(train_dir)}, num_workers=2, use_gpu=False,
                            cpus_per_worker=1, gpus_per_worker=0, placement_strategy="PACK", storage_dir=storage,
                            run_name="run", **kw)


# Two Ray Train runs of 2 workers (one killed and restarted by Ray Train): ~1 min on 2 idle cores, more when busy.
@pytest.mark.slow
def test_dpo_on_two_ray_workers_keeps_pairs_whole_and_a_killed_zero_run_resumes_to_ddps_weights(
        ray_cluster, crash_marker, tiny_model, tmp_path):
    """DPO on pairs through Ray Train, 2 workers x 4 pairs a step: DeepSpeed ZeRO-2 killed as step 3 starts and
    restarted by Ray Train from its step-2 checkpoint, against DDP unbroken. Each pair's reference log-probs
    are its policy's (a fresh LoRA adapter) plus a per-pair offset (i for chosen, i + 1 for rejected), so every
    pair's β-scaled margin is exactly β only when its chosen and rejected rows (and their reference values)
    meet in one forward pass: a pair split across micro-batches or workers, or sides of different pairs
    matched, would give i' + 1 - i for some i' != i."""
    import json
    import math

    import torch
    from safetensors.torch import load_file

    from instune.train.preference_loss import PreferenceSettings

    from .train_helpers import arithmetic_pairs, write_pairs

    numbers = [(a, b) for a in range(1, 5) for b in range(1, 5)]  # 16 pairs: an epoch is 2 steps of 2 x 4
    write_pairs(tiny_model, tmp_path / "pairs", arithmetic_pairs(numbers),
                reference_offsets=[(float(i), float(i + 1)) for i in range(len(numbers))])
    beta = 0.5
    common = dict(model_path=str(tiny_model), total_steps=4, micro_batch_size=4, log_every=1, eval_every=None,
                  checkpoint_every=2, lr=2e-2, warmup_ratio=0.0, objective="dpo",
                  preference=PreferenceSettings(beta=beta),
                  method=MethodSettings(method="lora", r=4, alpha=8, dropout=0.0))
    crash_marker.write_text("3")
    zero, zero_metrics = ray_pair_training(LoopSettings(**common, **ZERO_2), tmp_path / "pairs", tmp_path / "zero",
                                           max_failures=1)
    assert not crash_marker.exists()  # the last worker died as step 3 started
    ddp, ddp_metrics = ray_pair_training(LoopSettings(**common), tmp_path / "pairs", tmp_path / "ddp")

    first = json.loads(ddp_metrics.read_text().splitlines()[0])
    assert first["rewards/margin"] == pytest.approx(beta, abs=1e-5) and first["rewards/accuracy"] == 1.0
    assert first["loss"] == pytest.approx(-math.log(1 / (1 + math.exp(-beta))), abs=1e-5)  # -log σ(β), every pair
    zero_lines = [json.loads(line) for line in zero_metrics.read_text().splitlines()]
    ddp_lines = [json.loads(line) for line in ddp_metrics.read_text().splitlines()]
    # Steps 1 and 2 once: the restarted group resumed at step 3 from the step-2 checkpoint, not from the start.
    assert [m["step"] for m in zero_lines] == [1, 2, 3, 4] == [m["step"] for m in ddp_lines]
    assert [m["loss"] for m in zero_lines] == pytest.approx([m["loss"] for m in ddp_lines], abs=1e-4)
    assert ddp_lines[-1]["loss"] < ddp_lines[0]["loss"]
    # The resumed ZeRO-2 run ends with the unbroken DDP run's weights: weights, optimizer state, schedule and
    # data position all came back.
    with zero.checkpoint.as_directory() as resumed_dir, ddp.checkpoint.as_directory() as straight_dir:
        resumed = load_file(f"{resumed_dir}/trainable.safetensors")
        straight = load_file(f"{straight_dir}/trainable.safetensors")
        state = json.loads(Path(resumed_dir, "trainer_state.json").read_text())
    # The data position came back too: 4 micro-batches a worker, 2 before the kill and 2 after.
    assert state == {"step": 4, "micro_batches_done": 4, "world_size": 2}
    assert resumed.keys() == straight.keys() and resumed
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-4, msg=name)


# Two `instune vlm` train steps on Ray Train (one of 2 workers, killed and restarted by Ray Train): ~1 min on 2 idle
# cores, more when busy.
@pytest.mark.slow
def test_vlm_zero3_on_two_ray_workers_killed_and_resumed_matches_zero2_on_one(
        ray_cluster, crash_marker, vlm_rows, tmp_path):  # noqa: F811
    """The vision-language run's train step (vlm_run.train, what `instune vlm` runs) with DeepSpeed: ZeRO-3 on 2
    Ray Train workers, the last one killed as step 3 starts and the group restarted from the step-2 checkpoint,
    against ZeRO-2 on 1 worker unbroken. Every step is one pass over all 16 rows (1 worker x 16, 2 workers x 8),
    so both take the same steps. Full fine-tuning: ZeRO-3 partitions the frozen vision tower's weights too, and
    they must come back whole and unchanged in the checkpoint and the export, which loads with its processor."""
    import json

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from instune.config import VlmExperimentConfig
    from instune.vlm_run import train as vlm_train

    model_dir, files = vlm_rows
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "tokenized").symlink_to(Path(files[0]).parent)  # where `instune vlm`'s prepare writes the rows

    def run(name: str, workers: int, zero_stage: int, **train):
        config = VlmExperimentConfig.model_validate({
            "output_dir": str(tmp_path / name), "data": {"sources": [{"name": "s", "path": files}],
                                                         "eval_sources": [{"name": "s", "path": files}]},
            "peft": {"method": "full"}, "strategy": {"name": "deepspeed", "zero_stage": zero_stage},
            "scaling": {"num_workers": workers},
            "train": {"max_steps": 4, "micro_batch_size": 16 // workers, "lr": 1e-3, "warmup_ratio": 0,
                      "log_every": 1, "checkpoint_every": 2, **train}})
        merged = vlm_train(config, str(model_dir), tmp_path / name, data_dir=data_dir)
        run_dir = tmp_path / name / "train" / "run"
        # Ray Train names checkpoint directories by the time they were reported.
        latest = max(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return metrics, load_file(str(latest / "trainable.safetensors")), merged

    one, straight, _ = run("one", 1, 2)
    crash_marker.write_text("3")  # the last worker dies as step 3 starts; step 2 has the latest checkpoint
    metrics, resumed, merged = run("killed", 2, 3, max_failures=1)
    assert not crash_marker.exists()  # the crash happened
    # Steps 1 and 2 once (the restart resumed at step 3 from the step-2 checkpoint, not from the start).
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] == [m["step"] for m in one]
    losses = [m["loss"] for m in metrics]
    assert losses == pytest.approx([m["loss"] for m in one], abs=1e-4)
    assert losses[-1] < losses[0] - 0.1  # the steps moved the model
    assert resumed.keys() == straight.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-4, msg=name)

    base = AutoModelForImageTextToText.from_pretrained(model_dir).state_dict()
    vision = [n for n in resumed if ".vision_tower." in f".{n}"]
    assert vision and all(torch.equal(resumed[n], base[n]) for n in vision)
    trained = [n for n in resumed if n not in vision and not torch.equal(resumed[n], base[n])]
    assert any("multi_modal_projector" in n for n in trained) and any("language_model" in n for n in trained)

    exported = AutoModelForImageTextToText.from_pretrained(merged).state_dict()
    assert all(torch.equal(exported[n], resumed[n]) for n in resumed)
    processor = AutoProcessor.from_pretrained(merged)
    assert processor.image_token == "<image>" and processor.tokenizer.chat_template
