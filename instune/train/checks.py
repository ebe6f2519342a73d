"""Settings that cannot work, refused with one line before any worker starts.

What cannot work, and why:
- LISA with DeepSpeed: every ZeRO stage flattens the trainable parameters into fixed partitions when the
  engine is built, so the set of trainable layers cannot change during the run (LISA changes it every
  period). DDP re-registers its gradient hooks, so LISA runs on DDP.
- Prefix or prompt tuning on packed data: PEFT drops position_ids for prompt tuning, and transformers only
  separates packed examples when there is no KV cache (prefix tuning is one), so packed examples would
  attend to each other. Padded rows (`data.pack: false`) are exact.
- BitFit on a model with no bias terms (Llama-style models have none): nothing would train.
- float16 under DDP: it needs loss scaling, which only the DeepSpeed strategy does here; bfloat16 does not.
- flex_attention without a GPU: PyTorch's flex attention has no backward pass on the CPU.
- varlen_attention without a GPU, or on a PyTorch without torch.nn.attention.varlen: its flash kernel is
  CUDA-only (train/varlen_attention.py).
- model.kernels: liger without a GPU or without the liger-kernel package: Liger's kernels are Triton (CUDA).
- Raw `strategy.deepspeed` keys that pick another DeepSpeed checkpoint engine (the fast or decoupled writers,
  DataStates) or universal checkpoints: resuming reads DeepSpeed's files through its torch engine with the
  weights-only unpickler (strategies/deepspeed_load.py); universal checkpoints load with full pickle, and the
  other engines fail on ZeRO's own classes.
Prefix and prompt tuning do run under ZeRO-3 (their tables are gathered like any parameter), so ZeRO-3
refuses no method; it is pointless for them (a few thousand parameters) but not wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

from instune.errors import UserError
from instune.model_source import model_files


def model_parameter_names(model_path: str) -> list[str]:
    """Parameter names of the model at `model_path`, built on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_files(model_path).directory))
    return [name for name, _ in model.named_parameters()]


def num_decoder_layers(model_path: str) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_files(model_path).directory).num_hidden_layers


def check_training_plan(settings, packed: bool | None) -> None:
    """Raise UserError for method/strategy/data combinations that cannot work (see the module docstring).

    `settings` is the LoopSettings the workers would get; `packed` is data.pack (None: not known here).
    """
    method = settings.method.method
    if method == "lisa" and settings.strategy == "deepspeed":
        raise UserError("peft.method: lisa changes which layers train every period, but DeepSpeed ZeRO fixes "
                        "the trainable parameters when it starts; use strategy.name: ddp")
    if method in ("prefix", "prompt") and packed:
        raise UserError(f"data.pack: {method} tuning needs padded rows (set data.pack: false); with packing, "
                        "examples in a row would attend to each other")
    if method == "bitfit" and not any(n.endswith(".bias") for n in model_parameter_names(settings.model_path)):
        raise UserError(f"peft.method: bitfit trains bias terms, but {settings.model_path} has none; "
                        "use lora or ia3")
    if method == "lisa" and settings.method.lisa_layers > num_decoder_layers(settings.model_path):
        raise UserError(f"peft.lisa_layers: {settings.method.lisa_layers} is more than the "
                        f"{num_decoder_layers(settings.model_path)} decoder layers of {settings.model_path}")
    if settings.dtype == "float16" and settings.strategy == "ddp":
        raise UserError("model.dtype: float16 needs loss scaling, which the ddp strategy does not do; "
                        "use bfloat16 or strategy.name: deepspeed")
    if settings.attn_implementation == "flex_attention" and not settings.use_gpu:
        raise UserError("model.attn_implementation: flex_attention cannot train on the CPU (PyTorch has no "
                        "backward pass for it there); use sdpa, or scaling.use_gpu: true")
    check_attention_and_kernels(settings)
    if settings.strategy == "deepspeed":
        check_deepspeed_checkpointing(settings.deepspeed)


def check_attention_and_kernels(settings) -> None:
    """Raise UserError for varlen attention or Liger's kernels where they cannot run (module docstring)."""
    from instune.train.kernels import liger_installed
    from instune.train.varlen_attention import VARLEN, varlen_available

    if settings.attn_implementation == VARLEN:
        if not settings.use_gpu:
            raise UserError(f"model.attn_implementation: {VARLEN} cannot run on the CPU (PyTorch's varlen flash "
                            "kernel is CUDA-only); use sdpa, or scaling.use_gpu: true")
        if not varlen_available():
            raise UserError(f"model.attn_implementation: {VARLEN} needs torch.nn.attention.varlen (PyTorch 2.9 or "
                            "later); use sdpa or flex_attention")
    if settings.kernels == "liger":
        if not settings.use_gpu:
            raise UserError("model.kernels: liger needs a CUDA GPU (Liger's kernels are Triton); use auto or none, "
                            "or scaling.use_gpu: true")
        if not liger_installed():
            raise UserError("model.kernels: liger needs the liger-kernel package (pip install 'instune[gpu]'); "
                            "use auto or none")


def check_deepspeed_checkpointing(raw: dict) -> None:
    """Raise UserError for raw DeepSpeed keys that choose a checkpoint engine other than the torch one."""
    checkpoint = raw.get("checkpoint") or {}
    chosen = []
    if checkpoint.get("writer") is not None:
        chosen.append("strategy.deepspeed.checkpoint.writer")
    if checkpoint.get("load_universal"):
        chosen.append("strategy.deepspeed.checkpoint.load_universal")
    # DeepSpeed turns DataStates on for any value but False.
    if raw.get("datastates_ckpt", False) is not False:
        chosen.append("strategy.deepspeed.datastates_ckpt")
    if chosen:
        raise UserError(f"{', '.join(chosen)}: instune resumes only through DeepSpeed's torch checkpoint engine, "
                        "whose files it reads without unpickling code; remove these keys")


def check_cluster_fits(num_workers: int, cpus_per_worker: float, gpus_per_worker: float, use_gpu: bool) -> None:
    """Raise UserError when the running Ray cluster cannot place the workers (Ray would wait forever)."""
    import ray

    available = ray.cluster_resources()
    gpus = (gpus_per_worker or 1) if use_gpu else 0
    for resource, per_worker, field in (("CPU", cpus_per_worker, "scaling.cpus_per_worker"),
                                        ("GPU", gpus, "scaling.gpus_per_worker")):
        needed = num_workers * per_worker
        if needed > available.get(resource, 0) + 1e-9:
            raise UserError(f"scaling.num_workers: {num_workers} workers x {per_worker} {resource} "
                            f"({field}) need {needed:g} {resource}s, but the Ray cluster has "
                            f"{available.get(resource, 0):g}")


def check_resume_dir(run_dir: str | Path, method_settings, strategy: str, num_workers: int) -> None:
    """A run directory (a local path or a URI) that already holds checkpoints is resumed from; refuse ones
    this run cannot load."""
    from dataclasses import asdict

    from instune import storage
    from instune.train.checkpoint import METHOD_FILE, STATE_FILE

    # Ray Train names them checkpoint_<time>/, beside its checkpoint_manager_snapshot.json.
    for name in storage.list_dirs(run_dir, prefix="checkpoint_"):
        checkpoint = storage.join(run_dir, name)
        if not storage.is_file(storage.join(checkpoint, STATE_FILE)):
            raise UserError(f"{checkpoint}: not a checkpoint this version of instune can resume from; "
                            f"delete {run_dir} to start over")
        saved = json.loads(storage.read_text(storage.join(checkpoint, METHOD_FILE)))
        if saved != json.loads(json.dumps(asdict(method_settings))):
            raise UserError(f"{run_dir}: holds checkpoints of a different peft setting ({saved['method']}); "
                            "delete it or use another output_dir")
        world = json.loads(storage.read_text(storage.join(checkpoint, STATE_FILE)))["world_size"]
        if strategy == "deepspeed" and world != num_workers:
            raise UserError(f"scaling.num_workers: {num_workers}, but {checkpoint} holds DeepSpeed shards of "
                            f"{world} workers; resume with {world} workers")
