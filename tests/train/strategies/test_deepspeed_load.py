"""DeepSpeed checkpoints are read with torch's weights-only unpickler: every ZeRO stage resumes exactly through
it, and a checkpoint file holding any other pickled object is refused before that object is built.

The runs train in this test process as the only worker of a gloo process group, which is all DeepSpeed needs
and much cheaper than a torchrun launch; the two-worker ZeRO-3 resume is in test_deepspeed.py.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil

import pytest
import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from safetensors.torch import load_file
from ..train_helpers import read_metrics, write_packed_rows

from instune.train.checkpoint import WEIGHTS_FILE
from instune.train.loop import LoopSettings, run_training
from instune.train.methods import MethodSettings
from instune.train.sessions import FileSession
from instune.train.strategies.deepspeed import CHECKPOINT_DIR, TAG
from instune.train.strategies.deepspeed_load import DEEPSPEED_CLASSES, UnsafeCheckpointError

# The torch optimizer runs on the CPU for offloaded state (no CPU Adam build in the tests).
DEEPSPEED = dict(strategy="deepspeed", deepspeed={"zero_force_ds_cpu_optimizer": False})
ZERO = {"zero1": dict(zero_stage=1), "zero2_offload": dict(zero_stage=2, offload_optimizer=True),
        "zero3": dict(zero_stage=3)}


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory):
    """torch.distributed with this process as its only worker; a file rendezvous, so no port is taken."""
    store = tmp_path_factory.mktemp("process_group") / "store"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LOCAL_RANK", "0")  # DeepSpeed reads it; torchrun and Ray Train set it for real workers
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        yield
        dist.destroy_process_group()


def train(tiny_model, rows, output, total_steps: int, **strategy) -> None:
    """Train LoRA to `total_steps`, resuming from `output`'s latest checkpoint if it has one."""
    settings = LoopSettings(model_path=str(tiny_model), total_steps=total_steps, micro_batch_size=4, log_every=1,
                            lr=1e-2, warmup_ratio=0.0, method=MethodSettings(method="lora", r=4, dropout=0.0),
                            **strategy)
    run_training(settings, FileSession({"train": [str(rows / "part-0.parquet")]}, str(output)))


def test_every_zero_stage_resumes_exactly_through_weights_only_loading(one_worker, tiny_model, tmp_path):
    """Two steps in two runs end with the same adapter as two steps of DDP in one: the weights-only reader
    restored the weights, AdamW moments and schedule of each stage's checkpoint."""
    rows = write_packed_rows(tmp_path / "rows", 8, seed=4)
    train(tiny_model, rows, tmp_path / "ddp", 2)
    straight = load_file(str(tmp_path / "ddp/checkpoints/step-00000002" / WEIGHTS_FILE))
    for name, zero in ZERO.items():
        train(tiny_model, rows, tmp_path / name, 1, **DEEPSPEED, **zero)
        train(tiny_model, rows, tmp_path / name, 2, **DEEPSPEED, **zero)
        assert [m["step"] for m in read_metrics(tmp_path / name)] == [1, 2], name
        resumed = load_file(str(tmp_path / name / "checkpoints/step-00000002" / WEIGHTS_FILE))
        assert resumed.keys() == straight.keys()
        for n in straight:
            torch.testing.assert_close(resumed[n], straight[n], rtol=0, atol=1e-5, msg=f"{name}: {n}")


class RunsACommand:
    """Unpickling this calls os.system, as a tampered checkpoint could; here the command only makes `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def add_object(path, key: str, value) -> None:
    """Rewrite the checkpoint file at `path` with one more top-level entry."""
    with torch.serialization.safe_globals(DEEPSPEED_CLASSES):
        state = torch.load(path, weights_only=True)
    state[key] = value
    torch.save(state, path)


def test_a_checkpoint_file_holding_another_pickled_object_is_refused_not_run(one_worker, tiny_model, tmp_path):
    rows = write_packed_rows(tmp_path / "rows", 8, seed=4)
    train(tiny_model, rows, tmp_path / "saved", 1, **DEEPSPEED, zero_stage=2)
    files = sorted((tmp_path / "saved/checkpoints/step-00000001" / CHECKPOINT_DIR / TAG).glob("*.pt"))
    assert [f.name for f in files] == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]

    marker = tmp_path / "command_ran"
    for file in files:
        tampered = tmp_path / f"tampered_{file.stem}"
        shutil.copytree(tmp_path / "saved", tampered)
        tampered_file = tampered / file.relative_to(tmp_path / "saved")
        add_object(tampered_file, "note", RunsACommand(marker))
        with pytest.raises(UnsafeCheckpointError, match=rf"{re.escape(str(tampered_file))}: refused to load: "
                                                        r".*\(.*posix\.system.*\)"):
            train(tiny_model, rows, tampered, 2, **DEEPSPEED, zero_stage=2)
        assert not marker.exists(), f"unpickling {file.name} ran the command"
        assert [m["step"] for m in read_metrics(tampered)] == [1]  # nothing trained after the refusal

    # What the refusal prevents: DeepSpeed's own engine runs the command while it reads the file.
    TorchCheckpointEngine().load(str(tampered_file))
    assert marker.exists()
