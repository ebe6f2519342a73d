"""DeepSpeed's checkpoint files, read with torch.load(weights_only=True).

DeepSpeed 0.19's TorchCheckpointEngine reads its model-state and optimizer-state files with
`torch.load(weights_only=False)`, and it has no setting to change that, so a checkpoint file changed in
shared storage could run code in every worker that resumes from it. WeightsOnlyCheckpointEngine writes the
same files and reads them with torch's weights-only unpickler, which builds tensors, containers and
primitives only, plus the few DeepSpeed classes that ZeRO stores beside the tensors (DEEPSPEED_CLASSES);
anything else in a file is refused before any of it is built.

Imported only when the DeepSpeed strategy runs (importing deepspeed is slow and probes for accelerators).
"""

from __future__ import annotations

import pickle
import re

import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

# Every non-tensor class in the checkpoint files of ZeRO-1, 2 and 3, with and without CPU offload, in float32,
# bfloat16 and float16 (listed by torch.serialization.get_unsafe_globals_in_checkpoint on real checkpoints):
# all in the optimizer-state files, none in the model-state ones. The stage, as an enum; the loss scaler,
# static except for float16; and under ZeRO-1/2 each parameter's (start, numel) in its flat partition. Each is
# rebuilt from its saved attributes, so no code of the file's choosing runs.
DEEPSPEED_CLASSES = [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds a pickled object other than tensors and DEEPSPEED_CLASSES."""


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """TorchCheckpointEngine whose `load` uses the weights-only unpickler; saving is unchanged."""

    def load(self, path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(DEEPSPEED_CLASSES):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(
                f"{path}: refused to load: it holds a pickled object that is neither a tensor nor one of "
                f"DeepSpeed's checkpoint classes ({refused_object(str(err))}). instune's checkpoints hold none, so the "
                "file was changed after it was saved; delete this checkpoint to resume from an earlier one"
            ) from err


def refused_object(message: str) -> str:
    """The global that torch's weights-only unpickler refused, as its error `message` names it."""
    # Not torch's whole message: it suggests weights_only=False, which is what this module exists to avoid.
    found = re.search(r"GLOBAL (\S+)", message)
    return found.group(1) if found else "an object the weights-only unpickler does not build"


def use_weights_only_loading(ds_engine) -> None:
    """Make the DeepSpeed engine `ds_engine` read checkpoints through WeightsOnlyCheckpointEngine."""
    made = ds_engine.checkpoint_engine
    # Other engines (the fast or decoupled writers, DataStates) are chosen by raw config keys, which
    # check_training_plan refuses; replacing one of them would silently change how checkpoints are written.
    assert type(made) is TorchCheckpointEngine, f"unexpected DeepSpeed checkpoint engine {type(made).__name__}"
    # Built as DeepSpeed builds its own (engine._configure_checkpointing), so the file format is the same.
    ds_engine.checkpoint_engine = WeightsOnlyCheckpointEngine(ds_engine._config)
