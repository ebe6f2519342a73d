"""Run the per-worker loop without Ray, under torchrun (or as one plain process):

    torchrun --nproc_per_node 2 -m instune.train.torchrun_main \\
        --settings settings.json --train-data DIR --output DIR [--validation-data DIR]

`settings.json` is `LoopSettings.to_dict()` (what the Ray driver passes as train_loop_config). Data are the
Parquet files a prepare run wrote (data/train, data/validation); metrics go to OUTPUT/metrics.jsonl and
checkpoints to OUTPUT/checkpoints/step-N, and a run started again on the same OUTPUT resumes from the latest.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from instune.errors import UserError
from instune.train.loop import LoopSettings, run_training
from instune.train.sessions import FileSession


def parquet_files(directory: str, flag: str) -> list[str]:
    files = sorted(str(p) for p in Path(directory).rglob("*.parquet"))
    if not files:
        raise UserError(f"{flag}: no *.parquet files under {directory}")
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m instune.train.torchrun_main", description=__doc__.split("\n")[0])
    parser.add_argument("--settings", required=True, help="LoopSettings as JSON")
    parser.add_argument("--train-data", required=True, help="directory of training Parquet files")
    parser.add_argument("--validation-data", help="directory of validation Parquet files")
    parser.add_argument("--output", required=True, help="directory for metrics.jsonl and checkpoints/")
    parser.add_argument("--keep-checkpoints", type=int, default=2)
    args = parser.parse_args(argv)

    settings = LoopSettings.from_dict(json.loads(Path(args.settings).read_text()))
    datasets = {"train": parquet_files(args.train_data, "--train-data")}
    if args.validation_data:
        datasets["validation"] = parquet_files(args.validation_data, "--validation-data")
    # torchrun sets WORLD_SIZE; a plain process still gets a one-rank group, which DeepSpeed needs.
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
    use_cuda = settings.use_gpu and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        run_training(settings, FileSession(datasets, args.output, seed=settings.seed, keep=args.keep_checkpoints))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
