"""What a training checkpoint holds and how a worker writes and reads it.

One directory per checkpoint, written by every worker into its own temporary directory and merged by the
session (Ray Train merges the workers' directories in storage; FileSession moves their files into one and renames it):

  trainable.safetensors   rank 0: the method's weights, whole (gathered under ZeRO-3), by parameter name
  method.json             rank 0: MethodSettings, so export can rebuild the same model from the base
  trainer_state.json      rank 0: optimizer step, micro-batches consumed (the data position), world size
  rng/rank-NNNNN.json     each rank: its Python, NumPy, torch (and CUDA) RNG states (plain JSON: nothing to unpickle)
  engine.pt | deepspeed/  the engine's optimizer and scheduler state (DeepSpeed: one shard per rank)
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from instune.train.methods import MethodSettings, saved_parameters

WEIGHTS_FILE = "trainable.safetensors"
METHOD_FILE = "method.json"
STATE_FILE = "trainer_state.json"
RNG_DIR = "rng"


def rng_file(directory: Path, rank: int) -> Path:
    return directory / RNG_DIR / f"rank-{rank:05d}.json"


def rng_state() -> dict:
    version, python_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    state = {"python": [version, list(python_state), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached_gauss)],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # Dropout on a GPU draws from the current device's generator, not the CPU one.
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(saved: dict) -> None:
    version, python_state, gauss = saved["python"]
    random.setstate((version, tuple(python_state), gauss))
    kind, keys, pos, has_gauss, cached_gauss = saved["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached_gauss))
    torch.set_rng_state(torch.tensor(saved["torch"], dtype=torch.uint8))
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(saved["cuda"], dtype=torch.uint8))


def save_checkpoint(directory: Path, engine, method: MethodSettings, *, step: int, micro_batches_done: int,
                    rank: int, world_size: int) -> None:
    """Write this rank's part of a checkpoint into `directory` (collective: every rank calls it)."""
    from safetensors.torch import save_file

    weights = engine.gathered_state(saved_parameters(engine.module, method.method))
    engine.save(directory)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / WEIGHTS_FILE))
        (directory / METHOD_FILE).write_text(json.dumps(asdict(method), indent=2))
        (directory / STATE_FILE).write_text(json.dumps(
            {"step": step, "micro_batches_done": micro_batches_done, "world_size": world_size}))
    rng = rng_file(directory, rank)
    rng.parent.mkdir(parents=True, exist_ok=True)
    rng.write_text(json.dumps(rng_state()))


def load_weights(model, directory: Path) -> None:
    """Copy the checkpoint's saved weights into `model`'s parameters of the same names."""
    from safetensors.torch import load_file

    weights = load_file(str(directory / WEIGHTS_FILE))
    params = dict(model.named_parameters())
    missing = sorted(set(weights) - set(params))
    assert not missing, f"checkpoint {directory} has weights the model lacks: {missing[:3]}"
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)


def load_checkpoint(directory: Path, engine, rank: int, deepspeed: bool) -> tuple[int, int]:
    """Restore weights, optimizer, scheduler and this rank's RNG; return (step, micro-batches consumed)."""
    state = json.loads((directory / STATE_FILE).read_text())
    if not deepspeed:
        # DeepSpeed restores the weights from its own shards in engine.load.
        load_weights(engine.module, directory)
    engine.load(directory)
    rng = rng_file(directory, rank)
    if rng.is_file():
        set_rng_state(json.loads(rng.read_text()))
    return state["step"], state["micro_batches_done"]


def read_method(directory: Path) -> MethodSettings:
    return MethodSettings(**json.loads((Path(directory) / METHOD_FILE).read_text()))
