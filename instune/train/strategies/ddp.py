"""Plain PyTorch DistributedDataParallel (or a single process when the world has one worker)."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


class DDPEngine:
    """Holds the wrapped model, optimizer and scheduler; the loop calls the same five methods on any engine."""

    def __init__(self, model, optimizer, scheduler, max_grad_norm: float):
        self.module = model
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
        self.model = model
        self.optimizer, self.scheduler, self.max_grad_norm = optimizer, scheduler, max_grad_norm
        self.distributed = distributed

    def no_sync(self, skip: bool):
        """Skip the gradient all-reduce for all but the last micro-step of an accumulation window."""
        return self.model.no_sync() if (skip and self.distributed) else contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def step(self) -> float:
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
