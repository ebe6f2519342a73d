"""One micro-batch of preference pairs through the policy: the summed pair loss and the step's metric sums.

Chosen and rejected of a pair are rows i and B + i of one forward pass on the same worker, so a pair is never
split across micro-batches or workers. Rows are right-padded (prepare_pairs.pad_rows) and attention is causal,
so padding after a sequence changes nothing before it; the columns no row uses are trimmed first.

The reference log-probs come from the batch (dpo.reference: precompute), from the policy with its LoRA
adapter switched off (adapter_disabled), or from a second frozen model (model).
"""

from __future__ import annotations

import torch

from instune.data.tokenize import IGNORE_INDEX
from instune.train.preference_loss import PreferenceSettings, pair_losses, response_logps, step_metrics, uses_reference
from instune.train.sessions import PAIR_COLUMNS, REFERENCE_COLUMNS  # noqa: F401  (the pair rows' columns)

# The metric sums pair_loss_sum adds up (preference_loss.step_metrics), in a fixed order for all-reduce.
METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen",
                "logps/rejected")


def stacked(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of shape (2B, W): the chosen rows, then the rejected rows, trimmed to the last
    labelled position any row has."""
    input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    used = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    width = int(used.max()) + 1 if len(used) else labels.size(1)
    return input_ids[:, :width], labels[:, :width]


def sides_logps(model, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed response log-probs, response token counts) per row."""
    length = input_ids.size(1)
    position_ids = torch.arange(length, device=input_ids.device).expand_as(input_ids)
    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    # Prompt tuning prepends its virtual tokens' logits; only the last `length` positions are the batch's.
    return response_logps(logits[:, -length:], labels)


def reference_logps(batch: dict, mode: str, policy, reference_model, input_ids, labels) -> torch.Tensor:
    """The reference's summed response log-probs per row (chosen rows, then rejected), without gradients."""
    if mode == "precompute":
        assert all(c in batch for c in REFERENCE_COLUMNS), \
            "the prepared pairs have no reference log-probs; prepare again with dpo.reference: precompute"
        return torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).to(torch.float32)
    with torch.no_grad():
        if mode == "adapter_disabled":
            with policy.disable_adapter():
                return sides_logps(policy, input_ids, labels)[0]
        assert reference_model is not None, "dpo.reference: model needs the reference model loaded"
        return sides_logps(reference_model, input_ids, labels)[0]


def pair_loss_sum(model, batch: dict, objective: str, settings: PreferenceSettings, *, policy=None,
                  reference_model=None, metrics: dict | None = None) -> torch.Tensor:
    """Sum of the pair losses of one micro-batch; adds the step's metric sums (and "pairs") into `metrics`.

    `model` runs the forward pass (the engine's wrapper, for DDP's gradient hooks); `policy` is the unwrapped
    PEFT model whose adapter `adapter_disabled` switches off."""
    input_ids, labels = stacked(batch)
    logps, tokens = sides_logps(model, input_ids, labels)
    pairs = batch["chosen_input_ids"].size(0)
    reference = None
    if uses_reference(objective):
        reference = reference_logps(batch, settings.reference, policy if policy is not None else model,
                                    reference_model, input_ids, labels).to(logps.device)
    result = pair_losses(objective, settings, logps[:pairs], logps[pairs:], tokens[:pairs], tokens[pairs:],
                         *((reference[:pairs], reference[pairs:]) if reference is not None else ()))
    if metrics is not None:
        for key, value in step_metrics(result, logps[:pairs], logps[pairs:]).items():
            metrics[key] = metrics.get(key, 0.0) + value
        metrics["pairs"] = metrics.get("pairs", 0) + pairs
    return result.losses.sum()


def count_pairs(batch: dict) -> int:
    """The unit a preference step's loss is averaged over: pairs (as token_loss_sum's is over target tokens)."""
    return int(batch["chosen_input_ids"].size(0))


def load_reference_model(model_path: str, device, dtype: torch.dtype):
    """A frozen copy of the base model (dpo.reference: model)."""
    from transformers import AutoModelForCausalLM

    from instune.model_source import local_model_dir

    model = AutoModelForCausalLM.from_pretrained(local_model_dir(model_path), dtype=dtype).to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def averaged(metric_sums: dict, pairs: float) -> dict:
    """Per-pair means of summed metrics (reward accuracy is then a fraction)."""
    return {key: value / max(pairs, 1) for key, value in metric_sums.items() if key != "pairs"}

