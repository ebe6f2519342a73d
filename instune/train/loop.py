"""The per-worker training loop: a plain function that Ray Train runs on each worker and torchrun can run too.

Where batches come from and where metrics and checkpoints go is the `session` (sessions.py); everything
else — model, method, optimizer, loss, checkpoint contents — is here, read top to bottom.

Loss normalisation: each optimizer step's loss is the sum of token losses over every target token of every
micro-batch on every worker, divided by the global count of those tokens. Gradients are therefore the same
whether the examples are spread over 1 worker or 8, with or without accumulation (a mean of per-batch means
would weight a short batch's tokens more). Both engines average gradients over workers, so each worker
scales its loss by the world size.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from instune.data.tokenize import IGNORE_INDEX
from instune.train import lisa
from instune.train.checkpoint import load_checkpoint, save_checkpoint
from instune.train.chunked_loss import FusedHead, fused_head, head_loss
from instune.train.decoder_layers import checkpoint_layers, compile_layers
from instune.train.kernels import apply_liger_blocks, choose_kernels, liger_installed, loss_sum_for
from instune.train.methods import PEFT_METHODS, MethodSettings, add_head_dropout, apply_method, count_parameters
from instune.train.metrics import flops_per_token, peak_flops, peak_memory_bytes
from instune.train.preference_loss import PreferenceSettings
from instune.train.sessions import CHECKPOINT_SCRATCH_PREFIX
from instune.train.varlen_attention import VARLEN, packed_attention_inputs, register_varlen_attention

# Fault injection for the resume tests: a file holding a step number; the last rank deletes it and dies
# when it reaches that step, once. Unset in real runs.
CRASH_MARKER_ENV = "INSTUNE_CRASH_MARKER"
# Ray Train's controller collects reports at its health checks (every 2 s); a worker that dies sooner
# takes its queued reports with it, so the test crash waits until the earlier reports are collected.
CRASH_DELAY_S = 5.0


@dataclass
class LoopSettings:
    model_path: str
    total_steps: int
    method: MethodSettings = field(default_factory=MethodSettings)
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"
    micro_batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int | None = None
    checkpoint_every: int | None = None
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    gradient_checkpointing_fraction: float = 1.0
    # auto | liger | none (kernels.py).
    kernels: str = "auto"
    # Compile each decoder layer (decoder_layers.py).
    compile: bool = False
    use_gpu: bool = False
    # More datasets (by name) whose loss is reported as `eval_loss/<name>` at each eval: a sweep's
    # per-domain eval sets, so a scheduler can compare trials in- and out-of-domain while they train.
    eval_datasets: list[str] = field(default_factory=list)
    # Dropout on the hidden state entering the LM head; 0 turns it off (see methods.add_head_dropout).
    head_dropout: float = 0.0
    strategy: str = "ddp"
    # DeepSpeed only; `deepspeed` holds raw config keys merged over the built config.
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    deepspeed: dict = field(default_factory=dict)
    # sft, or a preference loss on pairs (dpo, ipo, cdpo, simpo, orpo: preference_step.py) with its settings.
    objective: str = "sft"
    preference: PreferenceSettings = field(default_factory=PreferenceSettings)
    # Vision-language models only (vision.py): whether the vision tower trains (full fine-tuning; for LoRA
    # the driver's target_modules say it, vision.lora_targets).
    train_vision_tower: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoopSettings":
        d = dict(d)
        d["method"] = MethodSettings(**d["method"])
        if isinstance(d.get("preference"), dict):
            d["preference"] = PreferenceSettings(**d["preference"])
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


def model_inputs(batch: dict, varlen: bool) -> dict:
    """The forward pass's arguments for a batch; with varlen attention, its example boundaries too."""
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if "pixel_values" in batch:  # image-text rows (multimodal_batches.py)
        inputs["pixel_values"] = batch["pixel_values"]
    if varlen:
        inputs.update(packed_attention_inputs(batch["position_ids"]))
    return inputs


def token_loss_sum(model, batch: dict, head: FusedHead | None = None, varlen: bool = False) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over the target tokens of one batch.

    With `head` (the model's LM head and a summed linear cross-entropy, chunked_loss.py) the head computes the
    loss of the target positions and no logits tensor exists; without, from the model's logits.
    """
    length = batch["input_ids"].size(1)
    inputs = model_inputs(batch, varlen)
    if head is not None:
        with head_loss(head, batch["labels"][:, 1:], length, IGNORE_INDEX) as outputs:
            model(**inputs)
        assert len(outputs) == 1, f"the LM head ran {len(outputs)} times in one forward pass"
        return outputs[0]
    logits = model(**inputs).logits
    # Prompt tuning prepends its virtual tokens' logits; only the last `length` positions are the batch's.
    logits = logits[:, -length:]
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


def evaluate_loss(model, session, micro_batch_size: int, device, autocast,
                  name: str = "validation", loss_of=token_loss_sum, count_of=count_targets) -> float:
    """Token-weighted loss over the dataset `name` (this run's validation data), across all workers;
    `loss_of(model, batch)` is token_loss_sum with the run's head and attention settings (or a preference
    run's pair loss, averaged over the pairs `count_of` counts)."""
    model.eval()
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for batch in session.batches(name, micro_batch_size, 0):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                loss_sum += float(loss_of(model, batch))
            tokens += count_of(batch)
    model.train()
    loss_sum, tokens = all_reduce_sum([loss_sum, tokens], device)
    return loss_sum / max(tokens, 1)


def batch_tokens(batch: dict) -> int:
    """Positions a batch computes: its packed rows, or both sides of its pairs."""
    if "input_ids" in batch:
        return int(batch["input_ids"].numel())
    return int(batch["chosen_input_ids"].numel() + batch["rejected_input_ids"].numel())


def preference_loss_functions(settings: LoopSettings, engine, device, pair_sums: dict):
    """(loss of a micro-batch, pair counter) for a preference objective; the loss adds its metric sums into
    `pair_sums`."""
    from instune.train.preference_loss import uses_reference
    from instune.train.preference_step import count_pairs, load_reference_model, pair_loss_sum

    reference_model = None
    if uses_reference(settings.objective) and settings.preference.reference == "model":
        reference_model = load_reference_model(settings.preference.reference_model_path or settings.model_path,
                                               device, getattr(torch, settings.dtype))
    common = dict(objective=settings.objective, settings=settings.preference, policy=engine.module,
                  reference_model=reference_model, metrics=pair_sums)
    return partial(pair_loss_sum, **common), count_pairs


def reduced_pair_metrics(pair_sums: dict, device) -> dict:
    """Per-pair means over every worker of the metric sums of preference_step.pair_loss_sum."""
    from instune.train.preference_step import METRIC_NAMES

    totals = all_reduce_sum([pair_sums.get(k, 0.0) for k in METRIC_NAMES] + [pair_sums.get("pairs", 0)], device)
    return {k: v / max(totals[-1], 1) for k, v in zip(METRIC_NAMES, totals[:-1])}


def build_model(settings: LoopSettings, device, use_liger: bool = False, say_notes: bool = True):
    """The base model with the method applied, on `device`; identical on every worker (same seed)."""
    from instune.model_source import local_model_dir
    from instune.train.vision import freeze_vision_tower, is_vision_language, model_class

    # Under DDP, low-precision runs keep fp32 master weights for whatever trains and use autocast; a PEFT
    # method's frozen base stays in low precision (PEFT keeps its adapter weights in fp32). DeepSpeed
    # keeps its own fp32 master copy, so it gets the low-precision model.
    low_precision_base = settings.strategy == "deepspeed" or settings.method.method in PEFT_METHODS
    dtype = getattr(torch, settings.dtype) if low_precision_base else torch.float32
    if settings.attn_implementation == VARLEN:
        register_varlen_attention()
    vision_language = is_vision_language(settings.model_path)
    model = model_class(settings.model_path).from_pretrained(
        local_model_dir(settings.model_path), dtype=dtype, attn_implementation=settings.attn_implementation)
    model.config.use_cache = False
    if use_liger:
        note = apply_liger_blocks(model)  # before PEFT wraps the linear layers the fused MLP calls
        if note and say_notes:  # one worker says it, as for the kernels' fallback note
            print(f"instune: {note}", file=sys.stderr, flush=True)
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if settings.gradient_checkpointing_fraction < 1:
            checkpoint_layers(model, settings.gradient_checkpointing_fraction)
        if settings.method.method in PEFT_METHODS:
            model.enable_input_require_grads()
    model = apply_method(model, settings.method)
    if vision_language and not settings.train_vision_tower:
        freeze_vision_tower(model)
    if settings.head_dropout:
        add_head_dropout(model, settings.head_dropout)
    model = model.to(device)
    if settings.compile:
        compile_layers(model)
    return model


def make_optimizer(params, settings: LoopSettings, cpu_adam: bool):
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, weight_decay=settings.weight_decay)
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=settings.lr, weight_decay=settings.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


def make_engine(model, settings: LoopSettings):
    """The strategy's engine around a fresh optimizer and warmup+cosine schedule."""
    from instune.train.strategies.ddp import DDPEngine

    # LISA's optimizer sees every weight; frozen ones have no gradient, so no state and no update.
    params = list(model.parameters()) if settings.method.method == "lisa" else \
        [p for p in model.parameters() if p.requires_grad]
    ds_config = None
    if settings.strategy == "deepspeed":
        from instune.train.strategies.deepspeed import deepspeed_config, uses_cpu_adam

        ds_config = deepspeed_config(
            zero_stage=settings.zero_stage, offload_optimizer=settings.offload_optimizer,
            offload_params=settings.offload_params, micro_batch_size=settings.micro_batch_size,
            grad_accum=settings.grad_accum, max_grad_norm=settings.max_grad_norm, dtype=settings.dtype,
            pin_memory=settings.use_gpu, extra=settings.deepspeed)
    optimizer = make_optimizer(params, settings, cpu_adam=bool(ds_config) and uses_cpu_adam(ds_config))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(settings.total_steps,
                                                                           settings.warmup_ratio))
    if settings.method.method == "lisa":
        # Before the engine wraps the model, so DDP registers only the first period's layers.
        lisa.set_active_layers(model, lisa_layers_for(0, model, settings), optimizer)
    if ds_config is None:
        return DDPEngine(model, optimizer, scheduler, settings.max_grad_norm)
    from instune.train.strategies.deepspeed import DeepSpeedEngine

    return DeepSpeedEngine(model, optimizer, scheduler, ds_config)


def lisa_layers_for(period: int, model, settings: LoopSettings) -> list[int]:
    num_layers = len(lisa.decoder_layers(model))
    return lisa.active_layers(period, num_layers, settings.method.lisa_layers, settings.seed)


def follow_schedule(scheduler, lr: float, step: int) -> None:
    """Set the learning rate to this run's schedule at `step`. A checkpoint carries the rate of the run that
    wrote it, which is 0 at its last step and follows its own total_steps; a resumed run may train longer."""
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = lr * factor(step)


def crash_if_marked(step: int, rank: int, world_size: int) -> None:
    marker = os.environ.get(CRASH_MARKER_ENV)
    if marker and rank == world_size - 1 and os.path.isfile(marker):
        with open(marker) as f:
            if int(f.read().strip()) == step:
                os.remove(marker)
                time.sleep(CRASH_DELAY_S)
                os._exit(1)


def run_training(settings: LoopSettings, session) -> None:
    """Train for `settings.total_steps` optimizer steps, reporting through `session`."""
    from dataclasses import replace

    from instune.train.vision import method_for

    settings = replace(settings, method=method_for(settings.method, settings.model_path,
                                                   settings.train_vision_tower))
    seed_everything(settings.seed)
    device = torch.device(f"cuda:{session.local_rank}") if settings.use_gpu and torch.cuda.is_available() \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # DeepSpeed and NCCL use the current device
    compute_dtype = getattr(torch, settings.dtype)
    use_autocast = settings.strategy == "ddp" and compute_dtype != torch.float32

    def autocast():
        return torch.autocast(device.type, dtype=compute_dtype) if use_autocast else contextlib.nullcontext()

    rank, world = session.world_rank, session.world_size
    kernels = choose_kernels(settings.kernels, device.type, liger_installed())
    if kernels.fallback_note and rank == 0:
        print(f"instune: {kernels.fallback_note}", file=sys.stderr, flush=True)
    model = build_model(settings, device, use_liger=kernels.use_liger, say_notes=rank == 0)
    trainable, total = count_parameters(model)  # before ZeRO-3 partitions the parameters
    engine = make_engine(model, settings)
    if settings.method.method == "lisa":
        trainable, _ = count_parameters(model)  # the layers of one period
    # The loss without the logits tensor wherever the head is a plain linear layer (chunked_loss.py).
    token_loss_of = partial(token_loss_sum, head=fused_head(engine.module, loss_sum_for(kernels)),
                            varlen=settings.attn_implementation == VARLEN)
    loss_sum_of, count_of, pair_sums = token_loss_of, count_targets, {}
    if settings.objective != "sft":
        # Each step's loss is averaged over pairs instead of target tokens; pair_sums gathers its metrics.
        loss_sum_of, count_of = preference_loss_functions(settings, engine, device, pair_sums)
    # Same weights everywhere, different dropout masks per worker.
    torch.manual_seed(settings.seed + 1000 * rank)

    step, micro_done = 0, 0
    with session.latest_checkpoint() as checkpoint_dir:
        if checkpoint_dir is not None:
            step, micro_done = load_checkpoint(Path(checkpoint_dir), engine, rank,
                                               deepspeed=settings.strategy == "deepspeed")
            follow_schedule(engine.scheduler, settings.lr, step)
    batches = endless_batches(session, settings.micro_batch_size, skip=micro_done)
    lisa_period = 0

    per_token_flops = flops_per_token(total, trainable, settings.method.method in ("full", "lisa"))
    device_peak = peak_flops(device, compute_dtype)
    window_tokens, window_targets, window_start = 0.0, 0.0, time.perf_counter()
    loop_start = window_start
    model.train()
    while step < settings.total_steps:
        crash_if_marked(step + 1, rank, world)
        if settings.method.method == "lisa" and step // settings.method.lisa_period != lisa_period:
            lisa_period = step // settings.method.lisa_period
            lisa.set_active_layers(engine.module, lisa_layers_for(lisa_period, engine.module, settings),
                                   engine.optimizer)
            engine.trainable_changed()
        micro = [{k: v.to(device) for k, v in next(batches).items()} for _ in range(settings.grad_accum)]
        micro_done += settings.grad_accum
        local_targets = sum(count_of(b) for b in micro)
        local_real = sum(batch_tokens(b) for b in micro)
        global_targets, = all_reduce_sum([local_targets], device)
        loss_sum_local = 0.0
        for i, batch in enumerate(micro):
            with engine.no_sync(skip=i < len(micro) - 1):
                with autocast():
                    loss_sum = loss_sum_of(engine.model, batch)
                engine.backward(loss_sum * world / max(global_targets, 1))
            loss_sum_local += float(loss_sum.detach())
        lr = engine.scheduler.optimizer.param_groups[0]["lr"]
        grad_norm = engine.step()
        step_pair_sums = dict(pair_sums)
        pair_sums.clear()
        step += 1
        loss_sum_all, tokens_all = all_reduce_sum([loss_sum_local, local_real], device)
        window_tokens += tokens_all
        window_targets += global_targets

        last = step == settings.total_steps
        save = last or bool(settings.checkpoint_every and step % settings.checkpoint_every == 0)
        if step % settings.log_every and not save:
            continue
        now = time.perf_counter()
        # Training time only: eval, checkpoint and report time of the previous window is not counted.
        seconds = max(now - window_start, 1e-9)
        tokens_per_second = window_tokens / seconds
        metrics = {
            "step": step,
            "elapsed_s": now - loop_start,  # this worker's wall time since its loop started (after loading)
            "loss": loss_sum_all / max(global_targets, 1),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_second": tokens_per_second,  # every position computed, padding included
            "target_tokens_per_second": window_targets / seconds,
            "peak_memory_mb": peak_memory_bytes(device) / 2**20,
            "trainable_params": trainable,
            "total_params": total,
        }
        if device_peak:
            metrics["mfu"] = tokens_per_second * per_token_flops / (device_peak * world)
        if settings.objective != "sft":
            metrics.update(reduced_pair_metrics(step_pair_sums, device))
        # Checkpoints are scored by eval_loss, so every checkpoint step evaluates too.
        if settings.eval_every and (step % settings.eval_every == 0 or save):
            if session.has("validation"):
                metrics["eval_loss"] = evaluate_loss(engine.module, session, settings.micro_batch_size, device,
                                                     autocast, loss_of=loss_sum_of, count_of=count_of)
                if settings.objective != "sft":  # held-out reward accuracy and margin, from the eval's pairs
                    metrics.update({f"eval_{k}": v for k, v in reduced_pair_metrics(pair_sums, device).items()})
                    pair_sums.clear()
            for name in settings.eval_datasets:
                metrics[f"eval_loss/{name}"] = evaluate_loss(engine.module, session, settings.micro_batch_size,
                                                             device, autocast, name, token_loss_of)
        if save:
            with tempfile.TemporaryDirectory(prefix=CHECKPOINT_SCRATCH_PREFIX, dir=session.scratch_dir) as tmp:
                save_checkpoint(Path(tmp), engine, settings.method, step=step, micro_batches_done=micro_done,
                                rank=rank, world_size=world)
                session.report(metrics, Path(tmp))
        else:
            session.report(metrics, None)
        window_tokens, window_targets, window_start = 0.0, 0.0, time.perf_counter()
