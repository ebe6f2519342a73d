"""The loss without the logits tensor equals the logits path: values and gradients, on random tensors and on
the tiny model (full, LoRA, prompt tuning, head dropout, no_grad), and one training step of the loop."""

from __future__ import annotations

from functools import partial

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from .train_helpers import logits_sgd_step, write_packed_rows
from transformers import AutoModelForCausalLM

from instune.data.tokenize import IGNORE_INDEX
from instune.train.chunked_loss import chunked_linear_cross_entropy_sum, fused_head, rows_per_chunk
from instune.train.loop import LoopSettings, run_training, token_loss_sum
from instune.train.methods import MethodSettings, add_head_dropout, apply_method
from instune.train.sessions import FileSession


def reference_sum(hidden, weight, bias, targets, softcap=None):
    logits = F.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, reduction="sum")


@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunked_sum_and_gradients_equal_cross_entropy_of_the_logits(chunk_rows, softcap):
    torch.manual_seed(0)
    hidden = torch.randn(23, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    targets = torch.randint(0, 50, (23,))

    def value_and_grads(fn):
        for t in (hidden, weight, bias):
            t.grad = None
        loss = fn(hidden, weight, bias, targets, softcap)
        (loss * 3.0).backward()  # the loop scales the sum before backward
        return loss.detach(), [t.grad.clone() for t in (hidden, weight, bias)]

    expected, expected_grads = value_and_grads(reference_sum)
    got, got_grads = value_and_grads(partial(chunked_linear_cross_entropy_sum, chunk_rows=chunk_rows))
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-6, atol=0)
    assert float(expected_grads[1].abs().max()) > 0.1
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)  # fp32 sums of ~20 rows
    with torch.no_grad():
        torch.testing.assert_close(chunked_linear_cross_entropy_sum(hidden, weight, bias, targets, softcap, chunk_rows)
                                   .double(), expected.double(), rtol=1e-6, atol=0)


def test_a_frozen_head_gets_no_gradient_and_chunks_follow_the_vocabulary():
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(30, 8)  # frozen, as under LoRA
    chunked_linear_cross_entropy_sum(hidden, weight, None, torch.randint(0, 30, (5,)), chunk_rows=2).backward()
    assert weight.grad is None and hidden.grad.shape == (5, 8)
    assert rows_per_chunk(128_256) == 523  # a 128k vocabulary: 256 MiB of fp32 logits per chunk
    assert rows_per_chunk(32_000, budget_bytes=4 * 32_000 * 10) == 10


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> dict:
    rows = write_packed_rows(tmp_path_factory.mktemp("rows"), 8, seed=3)
    table = pq.read_table(rows / "part-0.parquet")
    return {k: torch.tensor(table[k].to_pylist()) for k in ("input_ids", "labels", "position_ids")}


def loss_and_grads(tiny_model, batch, method: str, chunked: bool, head_dropout: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    model = apply_method(AutoModelForCausalLM.from_pretrained(str(tiny_model)),
                         MethodSettings(method=method, r=4, dropout=0.0, num_virtual_tokens=3))
    if head_dropout:
        add_head_dropout(model, head_dropout)
    head = fused_head(model, partial(chunked_linear_cross_entropy_sum, chunk_rows=13)) if chunked else None
    torch.manual_seed(seed + 1)  # the same dropout masks in both paths
    targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    loss = token_loss_sum(model, batch, head=head) / targets  # what the loop backpropagates (one worker)
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method,head_dropout", [("full", 0.0), ("lora", 0.0), ("full", 0.5), ("prompt", 0.0)])
def test_the_model_loss_without_logits_equals_the_logits_path(tiny_model, batch, method, head_dropout):
    expected_loss, expected = loss_and_grads(tiny_model, batch, method, chunked=False, head_dropout=head_dropout)
    loss, grads = loss_and_grads(tiny_model, batch, method, chunked=True, head_dropout=head_dropout)
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert grads.keys() == expected.keys() and grads
    for name, g in expected.items():
        torch.testing.assert_close(grads[name], g, rtol=0, atol=1e-6, msg=name)
    assert max(float(g.abs().max()) for g in expected.values()) > 1e-4  # well above the tolerance


def test_the_head_is_restored_and_a_wrapped_head_keeps_the_logits_path(tiny_model, batch):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    head = fused_head(model, chunked_linear_cross_entropy_sum)
    with torch.no_grad():
        token_loss_sum(model, batch, head=head)
        logits = model(input_ids=batch["input_ids"]).logits  # the head is an nn.Linear again
    assert logits.shape == (*batch["input_ids"].shape, model.config.vocab_size)
    assert "forward" not in vars(model.lm_head) and not model.lm_head._forward_hooks
    wrapped = apply_method(AutoModelForCausalLM.from_pretrained(str(tiny_model)),
                           MethodSettings(method="lora", r=4, target_modules=["q_proj", "lm_head"]))
    assert fused_head(wrapped, chunked_linear_cross_entropy_sum) is None


def test_one_training_step_with_accumulation_equals_the_logits_step(tiny_model, tmp_path, capfd):
    # Plain SGD with lr 1 and no clipping: the weights after one step are the initial weights minus the
    # gradient of the logits path's loss, summed over all rows and divided by their target tokens. Two
    # workers: tests/train/test_loop.py's one-step test, against the same reference.
    rows = write_packed_rows(tmp_path / "rows", 8, seed=3)
    settings = LoopSettings(model_path=str(tiny_model), total_steps=1, optimizer="sgd", lr=1.0, warmup_ratio=0.0,
                            max_grad_norm=1e9, log_every=1, micro_batch_size=2, grad_accum=4,
                            method=MethodSettings(method="full"), kernels="auto")
    run_training(settings, FileSession({"train": [str(rows / "part-0.parquet")]}, str(tmp_path / "run")))
    # On the CPU, auto falls back to the chunked loss and says so in one line.
    said = [line for line in capfd.readouterr().err.splitlines() if "model.kernels" in line]
    assert said == ["instune: model.kernels: auto uses PyTorch's kernels and the chunked loss on cpu "
                    "(Liger's kernels are Triton, CUDA only)"]
    stepped = load_file(str(tmp_path / "run" / "checkpoints/step-00000001/trainable.safetensors"))
    expected = logits_sgd_step(tiny_model, rows)
    assert stepped.keys() == expected.keys()
    for name, weight in expected.items():
        torch.testing.assert_close(stepped[name], weight, rtol=0, atol=1e-6, msg=name)
