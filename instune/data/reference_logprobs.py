"""The frozen reference model's log-probabilities of each pair's responses, computed once in the data stage.

DPO, IPO and conservative DPO compare the policy's log-probability of each response with the reference's.
The reference never changes, so `dpo.reference: precompute` computes its summed response log-probs here, on
a Ray Data actor pool (one model per actor, a GPU each when the cluster has GPUs), and stores them as the
columns ref_chosen_logps and ref_rejected_logps; training then holds only the policy.

The sums are over the same labelled tokens, with the same next-token rule, as the training loop's
`response_logps`, so a precomputed value equals what the loop would compute with the reference's weights.
Sequences share forward passes by length as the scorer's do (score.length_batches).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from instune.data.score import length_batches
from instune.data.tokenize import IGNORE_INDEX

REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def response_logps(logits, labels, ignore_index: int = IGNORE_INDEX):
    """(summed log-probability of each row's labelled tokens, their count), torch tensors: token t is predicted
    by the logits at t-1. Only labelled positions are upcast to float32 (tokens x vocabulary is large)."""
    import torch

    targets = labels[:, 1:]
    scored = targets != ignore_index
    token_logps = torch.zeros(targets.shape, dtype=torch.float32, device=logits.device)
    picked = logits[:, :-1][scored].float()
    token_logps[scored] = picked.gather(-1, targets[scored].unsqueeze(-1)).squeeze(-1) - picked.logsumexp(-1)
    return token_logps.sum(dim=1), scored.sum(dim=1)


def padded(sequences: list[tuple[np.ndarray, np.ndarray]], pad_id: int):
    """(input_ids, labels, attention_mask) tensors of the sequences, padded on the right."""
    import torch

    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.as_tensor(ids)
        labels[row, :len(ids)] = torch.as_tensor(row_labels)
        attention_mask[row, :len(ids)] = 1
    return input_ids, labels, attention_mask


def sequence_logps(model, sequences: list[tuple[np.ndarray, np.ndarray]], pad_id: int, device) -> np.ndarray:
    """Summed response log-prob of each (input_ids, labels) sequence, in one padded forward pass."""
    import torch

    input_ids, labels, attention_mask = padded(sequences, pad_id)
    with torch.no_grad():
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                       use_cache=False).logits
        logps, _ = response_logps(logits, labels.to(device))
    return logps.cpu().numpy().astype(np.float64)


class ReferenceLogprobs:
    """Ray Data actor: holds the reference model; adds ref_chosen_logps and ref_rejected_logps to each batch of
    tokenized pairs (columns chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels)."""

    def __init__(self, model_path: str, pad_id: int, batch_size: int, max_batch_tokens: int,
                 dtype: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        from instune.model_source import local_model_dir

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # model.dtype, as the loop's policy computes in it (unset: the checkpoint's own dtype, transformers'
        # "auto", which need not be the run's).
        self.model = AutoModelForCausalLM.from_pretrained(
            local_model_dir(model_path), dtype=getattr(torch, dtype) if dtype else "auto").to(self.device).eval()
        self.pad_id, self.batch_size, self.max_batch_tokens = pad_id, batch_size, max_batch_tokens

    def logps(self, sequences: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Summed response log-probs, in forward passes of sequences of similar length."""
        out = np.zeros(len(sequences), dtype=np.float64)
        # batch_size counts pairs; a pass holds both sides of each.
        for group in length_batches([len(ids) for ids, _ in sequences], 2 * self.batch_size, self.max_batch_tokens):
            out[group] = sequence_logps(self.model, [sequences[i] for i in group], self.pad_id, self.device)
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        def column(name):
            return [np.asarray(v, dtype=np.int64) for v in batch[name].to_pylist()]

        chosen = list(zip(column("chosen_input_ids"), column("chosen_labels")))
        rejected = list(zip(column("rejected_input_ids"), column("rejected_labels")))
        logps = self.logps(chosen + rejected) if chosen else np.zeros(0)
        n = len(chosen)
        batch = batch.append_column(REFERENCE_COLUMNS[0], pa.array(logps[:n], pa.float64()))
        return batch.append_column(REFERENCE_COLUMNS[1], pa.array(logps[n:], pa.float64()))


def add_reference_logprobs(ds, *, model_path: str, pad_id: int, batch_size: int, max_batch_tokens: int,
                           num_actors: int, num_gpus: float, dtype: str | None = None):
    """`ds` (tokenized pairs) with the reference's summed response log-probs of both sides as columns."""
    return ds.map_batches(
        ReferenceLogprobs,
        fn_constructor_kwargs={"model_path": model_path, "pad_id": pad_id, "batch_size": batch_size,
                               "max_batch_tokens": max_batch_tokens, "dtype": dtype},
        batch_size=max(batch_size * 8, 64), batch_format="pyarrow", concurrency=num_actors, num_gpus=num_gpus)
