"""DeepSpeed ZeRO stages 1-3, with optional CPU offload of optimizer state and parameters.

Same interface as DDPEngine. Two things differ underneath and are handled here:
- Loss scaling: DeepSpeed divides the loss by gradient_accumulation_steps by default. The loop already
  divides by the global number of target tokens over all workers and micro-batches, so `backward` passes
  `scale_wrt_gas=False`; DeepSpeed still averages gradients over workers, as DDP does, and the loop's
  world-size factor undoes that for both.
- Accumulation: DeepSpeed counts micro-steps itself and reduces/updates at the boundary, so `engine.step()`
  must follow every backward; `backward` calls it for the micro-steps inside a window and `step` for the
  last one, where the update happens.
Under ZeRO-3 each rank holds a shard of every parameter; `gathered_state` gathers one parameter at a time
to rank 0, so saving never needs the whole model in one process's accelerator memory.
Resuming reads DeepSpeed's checkpoint files with torch's weights-only unpickler (deepspeed_load.py), not
with the full pickle DeepSpeed itself uses.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch.distributed as dist

CHECKPOINT_DIR = "deepspeed"
TAG = "state"


def merge(base: dict, extra: dict) -> dict:
    """`extra` over `base`, recursing into nested dicts (the user's raw keys win)."""
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def deepspeed_config(*, zero_stage: int, offload_optimizer: bool, offload_params: bool, micro_batch_size: int,
                     grad_accum: int, max_grad_norm: float, dtype: str, pin_memory: bool, extra: dict) -> dict:
    """A DeepSpeed config dict from our settings, with the user's raw `strategy.deepspeed` keys merged over."""
    zero: dict = {"stage": zero_stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin_memory}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        # Our optimizer is a plain torch one (AdamW or SGD) unless offloading picks DeepSpeed's CPU Adam.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }
    return merge(config, extra)


def uses_cpu_adam(config: dict) -> bool:
    """Offloaded optimizer state is updated on the CPU; DeepSpeed insists on its compiled CPU Adam there
    unless `zero_force_ds_cpu_optimizer` is false (then a torch optimizer runs on the CPU, slower)."""
    offloaded = config["zero_optimization"].get("offload_optimizer", {}).get("device", "none") != "none"
    return offloaded and config.get("zero_force_ds_cpu_optimizer", True)


def skip_shared_memory_allreduce() -> None:
    """Keep DeepSpeed from building its shared-memory all-reduce op when its comm backend starts on a CPU.

    DeepSpeed reads `deepspeed.ops.__compatible_ops__` only to decide whether to build that op, which serves
    its inference all-reduce; training reduces through torch.distributed. Left alone, every worker probes
    all ops with compiler runs and then builds or reloads the op's C++: 40 s on 2 cores in a fresh
    environment, seconds per worker start after that. An empty table says the op is unavailable.
    """
    import deepspeed.ops

    if "__compatible_ops__" not in vars(deepspeed.ops):
        deepspeed.ops.__compatible_ops__ = {}


class DeepSpeedEngine:
    """Holds the DeepSpeed engine (`.model`) around the unwrapped model (`.module`)."""

    def __init__(self, model, optimizer, scheduler, config: dict):
        import deepspeed

        from instune.train.strategies.deepspeed_load import use_weights_only_loading

        assert dist.is_initialized(), "DeepSpeed needs torch.distributed initialised (Ray Train or torchrun)"
        skip_shared_memory_allreduce()
        self.module = model
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config, dist_init_required=False)
        use_weights_only_loading(self.model)
        self.zero_stage = config["zero_optimization"]["stage"]

    def trainable_changed(self) -> None:
        raise AssertionError("ZeRO fixes the trainable parameters at initialisation; the driver rejects LISA")

    def no_sync(self, skip: bool):
        # DeepSpeed decides from its micro-step counter when to reduce; nothing to switch off here.
        return contextlib.nullcontext()

    def backward(self, loss):
        self.model.backward(loss, scale_wrt_gas=False)
        if not self.model.is_gradient_accumulation_boundary():
            self.model.step()  # inside a window this only advances DeepSpeed's micro-step counter

    def step(self) -> float:
        """Reduce, clip, update, advance the schedule; returns the gradient norm before clipping."""
        assert self.model.is_gradient_accumulation_boundary(), "step() must end an accumulation window"
        self.model.step()
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save(self, directory: Path) -> None:
        """Every rank writes its shard of optimizer state (and, under ZeRO-3, of the weights)."""
        self.model.save_checkpoint(str(directory / CHECKPOINT_DIR), tag=TAG, exclude_frozen_parameters=True)

    def load(self, directory: Path) -> None:
        # Frozen weights were not saved (they come from the base model); ZeRO's own checkpoints hold one
        # shard per rank, so resuming needs the same number of workers.
        path, _ = self.model.load_checkpoint(str(directory / CHECKPOINT_DIR), tag=TAG, load_module_strict=False,
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
        assert path is not None, f"no DeepSpeed state in {directory / CHECKPOINT_DIR}"

    def gathered_state(self, named_parameters) -> dict:
        """{name: CPU tensor} of the given whole parameters on rank 0 ({} elsewhere). Collective under
        ZeRO-3: every rank must call it with the same parameters."""
        import deepspeed

        rank0 = dist.get_rank() == 0
        state = {}
        for name, p in named_parameters:
            gather = deepspeed.zero.GatheredParameters([p]) if self.zero_stage == 3 else contextlib.nullcontext()
            with gather:
                if rank0:
                    state[name] = p.detach().cpu().clone()
        return state
