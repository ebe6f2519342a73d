"""Test helper: run several trainings one after another in the same torchrun processes, so a test pays
for process start-up and imports once. Usage: torchrun ... run_many.py RUNS.json, where RUNS.json is a list
of {"settings": LoopSettings dict, "train": [parquet files], "output": dir}."""

import json
import sys

import torch.distributed as dist

from instune.train.loop import LoopSettings, run_training
from instune.train.sessions import FileSession

if __name__ == "__main__":
    dist.init_process_group("gloo")
    for run in json.loads(open(sys.argv[1]).read()):
        settings = LoopSettings.from_dict(run["settings"])
        run_training(settings, FileSession({"train": run["train"]}, run["output"], seed=settings.seed))
        dist.barrier()
    dist.destroy_process_group()
