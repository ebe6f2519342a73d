"""The "pre-experienced" reference model of IFD as published (Li et al. 2024, "From Quantity to Quality").

IFD compares the answer's loss given the instruction with its loss alone. A base model that has never seen
the instruction format predicts answers about equally badly either way: on the embedded (randomly
initialised) base, IFD is about 1 everywhere and selects nothing. The paper first trains the base briefly on
a small sample of the data ("pre-experience", 1,000 records, one epoch), then scores every record with that
model. Here too the brief training is a full fine-tune (AdamW, assistant tokens only, as training does), saved
as a model the scoring actors load as any other reference. It runs as one Ray task (on a GPU when the
cluster has one), so the driver never holds the model; AdamW needs about 16 bytes per parameter, so for a
large reference pre-experience it once elsewhere and set score.model_path to it instead.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class PreExperience:
    """How the reference is pre-experienced (data.score.pre_experience_*)."""

    size: int  # records sampled
    epochs: int
    lr: float
    batch_size: int
    seed: int


def _sample_keys(batch: pa.Table, seed: int) -> pa.Table:
    keys = [int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "little") >> 1
            for i in batch["id"].to_pylist()]
    return pa.table({"id": batch["id"], "key": pa.array(keys, pa.int64())})


def _select(batch: pa.Table, wanted: set) -> pa.Table:
    mask = pa.array([i in wanted for i in batch["id"].to_pylist()], pa.bool_())
    return batch.select(["id", "messages"]).filter(mask)


def sample_conversations(ds, size: int, seed: int) -> list[list[dict]]:
    """The messages of `size` records drawn uniformly from `ds` by a seeded hash of their ids, in id order.

    The same ids are drawn whatever the blocks or workers; only two small columns and the sample itself come
    back to the driver."""
    from instune.data.raydata import collect

    keys = collect(ds.map_batches(_sample_keys, fn_kwargs={"seed": seed}, batch_format="pyarrow"))
    if keys is None:
        return []
    order = sorted(zip(keys["key"].to_pylist(), keys["id"].to_pylist()))[:size]
    chosen = collect(ds.map_batches(_select, fn_kwargs={"wanted": {i for _, i in order}}, batch_format="pyarrow"))
    rows = sorted(zip(chosen["id"].to_pylist(), chosen["messages"].to_pylist()))
    return [messages for _, messages in rows]


def pre_experience(model_path: str, tokenizer_path: str, conversations: list[list[dict]], out_dir: str,
                   max_length: int, settings: PreExperience) -> str:
    """Fine-tune the model on `conversations` (assistant tokens only) for a few epochs, save model and tokenizer
    to `out_dir`; returns `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instune.data.tokenize import IGNORE_INDEX, Tokenized, tokenize_batch
    from instune.model_source import local_model_dir

    torch.manual_seed(settings.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(local_model_dir(tokenizer_path))
    model = AutoModelForCausalLM.from_pretrained(local_model_dir(model_path), dtype=torch.float32).to(device)
    model.train()
    examples = [t for t in tokenize_batch(conversations, tokenizer, max_length, "prompt_left")
                if isinstance(t, Tokenized)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rng = random.Random(settings.seed)
    for _ in range(settings.epochs):
        rng.shuffle(examples)
        for start in range(0, len(examples), settings.batch_size):
            batch = examples[start:start + settings.batch_size]
            width = max(len(e.input_ids) for e in batch)
            input_ids = torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in batch])
            labels = torch.tensor([e.labels + [IGNORE_INDEX] * (width - len(e.labels)) for e in batch])
            mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in batch])
            loss = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                         labels=labels.to(device)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def pre_experienced_reference(ds, model_path: str, tokenizer_path: str, out_dir: str, max_length: int,
                              settings: PreExperience, num_gpus: float) -> str:
    """Sample `ds`, pre-experience the reference on the sample in a Ray task, and return the trained model's
    directory (`out_dir`, which every scoring actor must be able to read)."""
    import ray

    conversations = sample_conversations(ds, settings.size, settings.seed)
    print(f"[prepare] pre-experiencing the reference on {len(conversations)} sampled records", flush=True)
    task = ray.remote(num_gpus=num_gpus, num_cpus=1)(pre_experience)
    return ray.get(task.remote(model_path, tokenizer_path, conversations, out_dir, max_length, settings))
