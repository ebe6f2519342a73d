"""The per-worker training loop: a plain function that Ray Train runs on each worker and torchrun can run too.

Where batches come from and where metrics and checkpoints go is the `session` (sessions.py); everything
else — model, method, optimizer, loss, checkpoint contents — is here, read top to bottom.

Loss normalisation: each optimizer step's loss is the sum of token losses over every target token of every
micro-batch on every worker, divided by the global count of those tokens. Gradients are therefore the same
whether the examples are spread over 1 worker or 8, with or without accumulation (a mean of per-batch means
would weight a short batch's tokens more).
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from instune.data.tokenize import IGNORE_INDEX
from instune.train.methods import MethodSettings, apply_method, count_parameters
from instune.train.metrics import flops_per_token, peak_flops, peak_memory_bytes
from instune.train.strategies.ddp import DDPEngine

STATE_FILE = "trainer_state.pt"
MODEL_DIR = "model"


@dataclass
class LoopSettings:
    model_path: str
    total_steps: int
    method: MethodSettings = field(default_factory=MethodSettings)
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    micro_batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int | None = None
    checkpoint_every: int | None = None
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    use_gpu: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoopSettings":
        d = dict(d)
        d["method"] = MethodSettings(**d["method"])
        return cls(**d)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def token_loss_sum(model, batch: dict) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over the target tokens of one batch."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def count_targets(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def endless_batches(session, micro_batch_size: int, skip: int):
    """Yield micro-batches epoch after epoch, skipping the first `skip` (the data position on resume)."""
    epoch, seen = 0, 0
    while True:
        produced = 0
        for batch in session.batches("train", micro_batch_size, epoch):
            produced += 1
            seen += 1
            if seen > skip:
                yield batch
        assert produced, "the training data shard of this worker is empty"
        epoch += 1


def evaluate_loss(model, session, micro_batch_size: int, device) -> float:
    """Token-weighted loss over this run's validation data, across all workers."""
    model.eval()
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for batch in session.batches("validation", micro_batch_size, 0):
            batch = {k: v.to(device) for k, v in batch.items()}
            loss_sum += float(token_loss_sum(model, batch))
            tokens += count_targets(batch)
    model.train()
    loss_sum, tokens = all_reduce_sum([loss_sum, tokens], device)
    return loss_sum / max(tokens, 1)


def save_checkpoint(directory: Path, model, engine, step: int, micro_batches_done: int) -> None:
    model.save_pretrained(str(directory / MODEL_DIR), safe_serialization=True)
    torch.save({
        "step": step,
        "micro_batches_done": micro_batches_done,
        "engine": engine.state_dict(),
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
    }, directory / STATE_FILE)


def load_checkpoint(directory: Path, model, engine) -> tuple[int, int]:
    """Restore weights, optimizer, scheduler and RNG; return (step, micro-batches consumed)."""
    from safetensors.torch import load_file

    weights_dir = directory / MODEL_DIR
    files = sorted(weights_dir.glob("*.safetensors"))
    assert files, f"checkpoint {directory} has no weights"
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(weights_dir / "adapter_model.safetensors")))
    else:
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        model.load_state_dict(state, strict=False)
    # weights_only=False: the RNG state holds numpy objects; the file is one this loop wrote itself.
    state = torch.load(directory / STATE_FILE, weights_only=False)
    engine.load_state_dict(state["engine"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    return state["step"], state["micro_batches_done"]


def run_training(settings: LoopSettings, session) -> None:
    """Train for `settings.total_steps` optimizer steps, reporting through `session`."""
    from transformers import AutoModelForCausalLM

    seed_everything(settings.seed)
    device = torch.device(f"cuda:{session.local_rank}") if settings.use_gpu and torch.cuda.is_available() \
        else torch.device("cpu")
    dtype = getattr(torch, settings.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        settings.model_path, dtype=dtype, attn_implementation=settings.attn_implementation)
    model.config.use_cache = False
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if settings.method.method != "full":
            model.enable_input_require_grads()
    model = apply_method(model, settings.method).to(device)
    trainable, total = count_parameters(model)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(settings.total_steps, settings.warmup_ratio))
    engine = DDPEngine(model, optimizer, scheduler, settings.max_grad_norm)

    step, micro_done = 0, 0
    with session.latest_checkpoint() as checkpoint_dir:
        if checkpoint_dir is not None:
            step, micro_done = load_checkpoint(Path(checkpoint_dir), model, engine)
    batches = endless_batches(session, settings.micro_batch_size, skip=micro_done)

    world = session.world_size
    per_token_flops = flops_per_token(total, trainable, settings.method.method == "full")
    device_peak = peak_flops(device, dtype)
    window_tokens, window_start = 0.0, time.perf_counter()
    model.train()
    while step < settings.total_steps:
        micro = [{k: v.to(device) for k, v in next(batches).items()} for _ in range(settings.grad_accum)]
        micro_done += settings.grad_accum
        local_targets = sum(count_targets(b) for b in micro)
        local_real = sum(int(b["input_ids"].numel()) for b in micro)
        global_targets, = all_reduce_sum([local_targets], device)
        loss_sum_local = 0.0
        for i, batch in enumerate(micro):
            with engine.no_sync(skip=i < len(micro) - 1):
                loss_sum = token_loss_sum(engine.model, batch)
                # DDP averages gradients over workers, so scale by world size to get the global token mean.
                engine.backward(loss_sum * world / max(global_targets, 1))
            loss_sum_local += float(loss_sum.detach())
        lr = scheduler.get_last_lr()[0]
        grad_norm = engine.step()
        step += 1
        loss_sum_all, tokens_all = all_reduce_sum([loss_sum_local, local_real], device)
        window_tokens += tokens_all

        last = step == settings.total_steps
        if step % settings.log_every and not last:
            continue
        elapsed = time.perf_counter() - window_start
        tokens_per_second = window_tokens / max(elapsed, 1e-9)
        metrics = {
            "step": step,
            "loss": loss_sum_all / max(global_targets, 1),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_second": tokens_per_second,
            "peak_memory_mb": peak_memory_bytes(device) / 2**20,
            "trainable_params": trainable,
            "total_params": total,
        }
        if device_peak:
            metrics["mfu"] = tokens_per_second * per_token_flops / (device_peak * world)
        if settings.eval_every and (step % settings.eval_every == 0 or last) and session.has("validation"):
            metrics["eval_loss"] = evaluate_loss(engine.module, session, settings.micro_batch_size, device)
        save = last or (settings.checkpoint_every and step % settings.checkpoint_every == 0)
        if save and session.world_rank == 0:
            with tempfile.TemporaryDirectory(prefix="instune-ckpt-") as tmp:
                save_checkpoint(Path(tmp), model, engine, step, micro_done)
                session.report(metrics, Path(tmp))
        else:
            session.report(metrics, None)
        window_tokens, window_start = 0.0, time.perf_counter()
