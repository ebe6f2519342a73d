"""Plain PyTorch DistributedDataParallel (or a single process when the world has one worker).

Every engine (this one, deepspeed.py) offers the same interface to the loop: `.module` (the unwrapped model)
and `.model` (what the forward pass calls), `no_sync`, `backward`, `step`, `save`/`load` of its state in a
checkpoint directory, and `gathered_state` to read whole weights for saving.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist

ENGINE_FILE = "engine.pt"


def world_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class DDPEngine:
    """Holds the wrapped model, optimizer and scheduler."""

    def __init__(self, model, optimizer, scheduler, max_grad_norm: float):
        self.module = model
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.optimizer, self.scheduler, self.max_grad_norm = optimizer, scheduler, max_grad_norm
        self.model = self._wrap()

    def _wrap(self):
        if not self.distributed:
            return self.module
        # A vision-language model's batch may hold no image (text-only rows of a mix): its projector and vision
        # tower then get no gradient on that worker, which DDP must be told to expect.
        vision_language = getattr(getattr(self.module, "config", None), "vision_config", None) is not None
        return torch.nn.parallel.DistributedDataParallel(self.module, find_unused_parameters=vision_language)

    def trainable_changed(self) -> None:
        """Re-wrap after the set of trainable parameters changed (LISA): DDP registers its gradient hooks
        and buckets for the parameters that require grad when it is built."""
        self.model = self._wrap()

    def no_sync(self, skip: bool):
        """Skip the gradient all-reduce for all but the last micro-step of an accumulation window."""
        return self.model.no_sync() if (skip and self.distributed) else contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def step(self) -> float:
        """Clip, update, advance the schedule; returns the gradient norm before clipping."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save(self, directory: Path) -> None:
        """Optimizer and scheduler state (the same on every rank, so rank 0 writes it)."""
        if world_rank() == 0:
            torch.save(self.state_dict(), directory / ENGINE_FILE)

    def load(self, directory: Path) -> None:
        self.load_state_dict(torch.load(directory / ENGINE_FILE, map_location="cpu", weights_only=True))

    def gathered_state(self, named_parameters) -> dict:
        """{name: CPU tensor} of the given parameters on rank 0 ({} elsewhere): every rank holds them whole."""
        if world_rank() != 0:
            return {}
        return {name: p.detach().cpu().clone() for name, p in named_parameters}
