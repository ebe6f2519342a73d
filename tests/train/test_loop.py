"""The loop's promises: the same examples give the same update on any number of workers and with any
accumulation (DDP and DeepSpeed), and a seeded run repeats exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from .train_helpers import logits_sgd_step, read_metrics, two_worker_plan, write_packed_rows
from transformers import AutoModelForCausalLM

from instune.train.loop import LoopSettings, run_training, warmup_cosine
from instune.train.methods import MethodSettings
from instune.train.sessions import FileSession, rows_tensor

STEP_1 = "checkpoints/step-00000001/trainable.safetensors"


def test_warmup_then_cosine_to_zero():
    factor = warmup_cosine(100, 0.1)
    assert [factor(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert factor(55) == pytest.approx(0.5)
    assert factor(100) == pytest.approx(0.0)


def test_file_session_batches_are_the_rows_of_the_file(packed_rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(packed_rows, columns=["input_ids", "labels", "position_ids"])
    session = FileSession({"validation": [str(p) for p in packed_rows.glob("*.parquet")]}, str(packed_rows.parent))
    batches = list(session.batches("validation", 5, 0))  # in file order, the last batch short
    for name in ("input_ids", "labels", "position_ids"):
        assert torch.cat([b[name] for b in batches]).tolist() == table[name].to_pylist()
    # Chunked and sliced columns (what take() returns) keep their rows; ragged rows go through lists.
    chunked = pa.chunked_array([pa.array([[9, 9], [1, 2], [3, 4]]).slice(1), pa.array([[5, 6]])])
    assert rows_tensor(chunked).tolist() == [[1, 2], [3, 4], [5, 6]]
    with pytest.raises(ValueError):
        rows_tensor(pa.chunked_array([pa.array([[1, 2], [3]])]))


def test_file_session_moves_checkpoint_parts_and_clears_parts_a_dead_worker_left(tmp_path):
    stale = tmp_path / "out" / "checkpoints" / "instune-ckpt-dead"
    stale.mkdir(parents=True)
    (stale / "trainable.safetensors").write_text("half")
    session = FileSession({}, str(tmp_path / "out"))
    assert not stale.exists()
    part = session.scratch_dir / "instune-ckpt-live"
    (part / "rng").mkdir(parents=True)
    (part / "rng" / "rank-00000.json").write_text("{}")
    session.report({"step": 3}, part)
    assert sorted(p.name for p in session.scratch_dir.iterdir()) == ["instune-ckpt-live", "step-00000003"]
    assert (session.scratch_dir / "step-00000003" / "rng" / "rank-00000.json").read_text() == "{}"
    assert not any(p.is_file() for p in part.rglob("*"))  # moved, not copied


def test_a_seeded_run_repeats_exactly_and_another_seed_does_not(tiny_model, packed_rows, tmp_path):
    def losses(name, seed):
        settings = LoopSettings(model_path=str(tiny_model), total_steps=4, micro_batch_size=4, log_every=1,
                                lr=1e-2, seed=seed, head_dropout=0.5,
                                method=MethodSettings(method="lora", r=4, dropout=0.1))
        run_training(settings, FileSession({"train": [str(packed_rows / "part-0.parquet")]}, str(tmp_path / name),
                                           seed=seed))
        return [m["loss"] for m in read_metrics(tmp_path / name)]

    first = losses("a", 0)
    assert len(first) == 4
    assert losses("b", 0) == first
    assert losses("c", 1) != first


# Plain SGD with lr 1 and no clipping, one step: the weights after it are the initial weights minus the gradient.
ONE_SGD_STEP = dict(total_steps=1, optimizer="sgd", lr=1.0, warmup_ratio=0.0, max_grad_norm=1e9, log_every=1,
                    method=MethodSettings(method="full"))
TWO_WORKER_VARIANTS = {
    "ddp": dict(micro_batch_size=4),
    "ddp_accumulate": dict(micro_batch_size=2, grad_accum=2),
    "zero2_accumulate": dict(micro_batch_size=2, grad_accum=2, strategy="deepspeed", zero_stage=2),
    "zero3_accumulate": dict(micro_batch_size=1, grad_accum=4, strategy="deepspeed", zero_stage=3),
    # Offloaded optimizer state is updated on the CPU by the torch optimizer (no CPU Adam build).
    "zero3_offload": dict(micro_batch_size=4, strategy="deepspeed", zero_stage=3, offload_optimizer=True,
                          offload_params=True, deepspeed={"zero_force_ds_cpu_optimizer": False}),
}


@two_worker_plan("one_step")
def one_step_on_two_workers(model, directory):
    # Eight rows with different numbers of target tokens.
    rows = write_packed_rows(directory / "rows", 8, seed=3)
    files = [str(rows / "part-0.parquet")]
    return [{"settings": LoopSettings(model_path=str(model), **ONE_SGD_STEP, **v), "train": files,
             "output": directory / name} for name, v in TWO_WORKER_VARIANTS.items()]


@pytest.mark.slow
def test_one_step_is_the_same_on_one_worker_and_two_with_or_without_accumulation(tiny_model, two_worker_runs,
                                                                                  tmp_path):
    runs = two_worker_runs["one_step"]  # the variants on 2 workers, from the session's torchrun launch
    rows = runs / "rows"
    files = [str(rows / "part-0.parquet")]
    run_training(LoopSettings(model_path=str(tiny_model), **ONE_SGD_STEP, micro_batch_size=8),
                 FileSession({"train": files}, str(tmp_path / "one")))

    initial = dict(AutoModelForCausalLM.from_pretrained(str(tiny_model)).named_parameters())
    reference = load_file(str(tmp_path / "one" / STEP_1))
    gradient_size = max(float((initial[n].detach() - w).abs().max()) for n, w in reference.items())
    assert gradient_size > 1e-2  # the step moved the weights
    reference_loss = read_metrics(tmp_path / "one")[0]["loss"]
    # The one-worker step is the step of the loss computed from the whole logits tensor (the loop's loss runs
    # in the LM head without it, chunked_loss.py), so every variant below is too.
    for n, w in logits_sgd_step(tiny_model, rows).items():
        torch.testing.assert_close(reference[n], w, rtol=0, atol=1e-6, msg=f"logits path: {n}")
    for name in TWO_WORKER_VARIANTS:
        weights = load_file(str(runs / name / STEP_1))
        assert weights.keys() == reference.keys()
        for n, w in reference.items():
            torch.testing.assert_close(weights[n], w, rtol=0, atol=1e-6, msg=f"{name}: {n}")
        assert read_metrics(runs / name)[0]["loss"] == pytest.approx(reference_loss, rel=1e-6)


def one_sgd_step(tiny_model, rows, output, **kw) -> dict:
    settings = LoopSettings(model_path=str(tiny_model), total_steps=1, micro_batch_size=4, log_every=1,
                            optimizer="sgd", lr=1.0, warmup_ratio=0.0, max_grad_norm=1e9, **kw)
    run_training(settings, FileSession({"train": [str(rows / "part-0.parquet")]}, str(output)))
    return load_file(str(output / STEP_1))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_gradient_checkpointing_gives_the_same_step(tiny_model, packed_rows, tmp_path, method):
    settings = dict(method=MethodSettings(method=method, r=4, dropout=0.0))
    plain = one_sgd_step(tiny_model, packed_rows, tmp_path / "plain", **settings)
    checkpointed = one_sgd_step(tiny_model, packed_rows, tmp_path / "gc", gradient_checkpointing=True, **settings)
    for n, w in plain.items():
        torch.testing.assert_close(checkpointed[n], w, rtol=0, atol=1e-6)


def test_bfloat16_keeps_fp32_master_weights_for_full_fine_tuning(tiny_model, packed_rows, tmp_path):
    fp32 = one_sgd_step(tiny_model, packed_rows, tmp_path / "fp32", method=MethodSettings(method="full"))
    bf16 = one_sgd_step(tiny_model, packed_rows, tmp_path / "bf16", method=MethodSettings(method="full"),
                        dtype="bfloat16")
    assert all(w.dtype == torch.float32 for w in bf16.values())
    # Autocast computes in bfloat16 (about 3 significant digits), the update lands in fp32 weights.
    for n, w in fp32.items():
        torch.testing.assert_close(bf16[n], w, rtol=0.05, atol=0.02)
    assert any(not torch.equal(bf16[n], w) for n, w in fp32.items())


def test_a_finished_run_started_again_with_more_steps_trains_on_at_its_new_schedule(tiny_model, packed_rows,
                                                                                    tmp_path):
    def run(total_steps):
        settings = LoopSettings(model_path=str(tiny_model), total_steps=total_steps, micro_batch_size=4,
                                log_every=1, lr=1e-2, warmup_ratio=0.0, checkpoint_every=4,
                                method=MethodSettings(method="lora", r=4))
        run_training(settings, FileSession({"train": [str(packed_rows / "part-0.parquet")]}, str(tmp_path / "run")))

    run(4)
    run(8)
    lrs = {m["step"]: m["lr"] for m in read_metrics(tmp_path / "run")}
    assert sorted(lrs) == list(range(1, 9))
    # Step 5 is the first of the second run: the 8-step cosine at step 4 (half way), not the finished 4-step
    # cosine's last rate, and the restored RNG state is read back from its JSON file.
    factor = warmup_cosine(8, 0.0)
    assert [lrs[s] for s in range(5, 9)] == pytest.approx([1e-2 * factor(s) for s in range(4, 8)])
    assert lrs[5] == pytest.approx(5e-3)
