"""Per-set evaluation of one model: loss on the reference answers, and metrics of generated answers.

`EvalWorker` holds the model and turns one batch of examples into per-example loss sums and answers; the
Ray Data actor pool (`pool.py`) and the plain in-process `evaluate_in_process` both call it, and
`score_sets` turns the per-example rows into one `SetResult` per set.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from instune.data.tokenize import IGNORE_INDEX, Tokenized, tokenize_batch
from instune.eval.text_metrics import generation_scores

if TYPE_CHECKING:
    from instune.config import EvalConfig, ModelConfig


@dataclass
class EvalSet:
    name: str
    domain: str
    kind: str  # "in_domain" or "out_of_domain"
    records: list[dict]  # canonical records; the last assistant message is the reference answer


@dataclass
class SetResult:
    name: str
    domain: str
    kind: str
    examples: int
    loss: float  # mean per reference-answer token
    perplexity: float
    exact_match: float
    rouge_l: float
    bleu: float  # sacrebleu scale, 0-100
    chrf: float  # sacrebleu scale, 0-100

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SetResult":
        """Read back `to_dict` output; metrics an older file lacks are NaN."""
        return cls(**{f.name: d.get(f.name, float("nan")) for f in fields(cls)})


@dataclass
class EvalSettings:
    """How to evaluate: the plain values the workers need (from `model` and `eval` in the config)."""

    max_length: int
    max_new_tokens: int
    batch_size: int
    dtype: str = "float32"
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


# `eval` fields EvalSettings does not take, and where they go instead (tests/eval/test_evaluate.py checks that
# every other eval field reaches EvalSettings).
NOT_IN_EVAL_SETTINGS = {
    "eval.sets": "the stages read the records (stages.load_eval_sets)",
    "eval.max_examples": "the stages cut each set to it (stages.load_eval_sets)",
    "eval.num_actors": "the size of the Ray Data actor pool (pool.evaluate_with_ray)",
    "eval.outcome_marker": "the stages put the success marker in the eval prompts (eval/outcome_marker.py)",
}


def eval_settings(model: ModelConfig, eval: EvalConfig) -> EvalSettings:
    """EvalSettings from the config's `model` (max_length, dtype) and `eval` sections, field by name."""
    from instune.config import settings_from

    return settings_from(EvalSettings, {"model": model, "eval": eval})


def split_prompt(messages: list[dict]) -> tuple[list[dict], str]:
    """(messages before the last assistant turn, that turn's content)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def example_rows(eval_sets: list[EvalSet]) -> list[dict]:
    """One row per example, messages as JSON (Arrow-friendly), sorted by length so batches pad little."""
    rows = [{"set": s.name, "index": i, "messages": json.dumps(r["messages"], ensure_ascii=False)}
            for s in eval_sets for i, r in enumerate(s.records)]
    return sorted(rows, key=lambda row: len(row["messages"]))


def reference_loss_sums(model, tokenizer, conversations: list[list[dict]], max_length: int) -> list[tuple[float, int]]:
    """(loss sum, target tokens) per conversation over its assistant tokens, by teacher forcing.

    Right padding needs no attention mask here: a causal model never attends to later (pad) positions.
    """
    tokenized = tokenize_batch(conversations, tokenizer, max_length, "truncate")
    usable = [t if isinstance(t, Tokenized) else Tokenized([tokenizer.pad_token_id], [IGNORE_INDEX])
              for t in tokenized]
    width = max(len(t.input_ids) for t in usable)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([t.input_ids + [pad] * (width - len(t.input_ids)) for t in usable])
    labels = torch.tensor([t.labels + [IGNORE_INDEX] * (width - len(t.labels)) for t in usable])
    device = next(model.parameters()).device
    input_ids, labels = input_ids.to(device), labels.to(device)
    positions = torch.arange(width, device=device).expand_as(input_ids)
    logits = model(input_ids=input_ids, position_ids=positions, use_cache=False).logits
    targets = labels[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX,
                             reduction="none")
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    return [(float(s), int(c)) for s, c in zip(losses.sum(dim=1).tolist(), counts.tolist())]


def generate_answers(model, tokenizer, prompts: list[list[dict]], settings: EvalSettings, seed: int) -> list[str]:
    """Answers to one batch of prompts, left-padded so every prompt ends where generation starts."""
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    device = next(model.parameters()).device
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    sampling = {"do_sample": False}
    if settings.do_sample:
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}
    out = model.generate(**enc, max_new_tokens=settings.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, **sampling)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


class EvalWorker:
    """Holds one model; called on a batch of `example_rows`, returns them with loss sums and answers."""

    def __init__(self, model_path: str, base_model_path: str | None, settings: EvalSettings, use_gpu: bool = False,
                 tokenizer_path: str | None = None):
        from instune.eval.load import load_model_and_tokenizer

        self.settings = settings
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model, self.tokenizer = load_model_and_tokenizer(model_path, base_model_path, self.settings.dtype,
                                                              device, tokenizer_path)

    def __call__(self, batch: dict) -> dict:
        conversations = [json.loads(m) for m in batch["messages"]]
        prompts = [split_prompt(c)[0] for c in conversations]
        # The seed follows the batch's first example, not the actor, so reruns draw the same answers.
        seed = self.settings.seed + int(min(batch["index"]))
        with torch.no_grad():
            losses = reference_loss_sums(self.model, self.tokenizer, conversations, self.settings.max_length)
            answers = generate_answers(self.model, self.tokenizer, prompts, self.settings, seed)
        return {
            "set": np.asarray(batch["set"]),
            "index": np.asarray(batch["index"]),
            "loss_sum": np.array([s for s, _ in losses], dtype=np.float64),
            "tokens": np.array([c for _, c in losses], dtype=np.int64),
            "prediction": np.array(answers, dtype=object),
        }


def score_sets(eval_sets: list[EvalSet], rows: list[dict]) -> tuple[list[SetResult], list[dict]]:
    """(one SetResult per set, per-example predictions) from the rows the workers returned."""
    by_set: dict[str, dict[int, dict]] = {s.name: {} for s in eval_sets}
    for row in rows:
        by_set[str(row["set"])][int(row["index"])] = row
    results, predictions = [], []
    for s in eval_sets:
        got = by_set[s.name]
        assert len(got) == len(s.records), f"eval set {s.name}: {len(got)} answers for {len(s.records)} examples"
        references = [split_prompt(r["messages"])[1] for r in s.records]
        answers = [str(got[i]["prediction"]) for i in range(len(s.records))]
        tokens = sum(int(got[i]["tokens"]) for i in got)
        loss = sum(float(got[i]["loss_sum"]) for i in got) / tokens if tokens else float("nan")
        results.append(SetResult(s.name, s.domain, s.kind, len(s.records), loss, math.exp(min(loss, 50)),
                                 **generation_scores(answers, references)))
        predictions += [{"set": s.name, "index": i, "reference": ref, "prediction": a}
                        for i, (ref, a) in enumerate(zip(references, answers))]
    return results, predictions


def evaluate_in_process(model_path: str, eval_sets: list[EvalSet], settings: EvalSettings,
                        base_model_path: str | None = None, tokenizer_path: str | None = None
                        ) -> tuple[list[SetResult], list[dict]]:
    """The same evaluation without Ray, for tiny sets and tests: (results, predictions)."""
    worker = EvalWorker(model_path, base_model_path, settings, tokenizer_path=tokenizer_path)
    rows = example_rows(eval_sets)
    out = []
    for start in range(0, len(rows), settings.batch_size):
        chunk = rows[start:start + settings.batch_size]
        batch = worker({key: np.array([r[key] for r in chunk], dtype=object) for key in chunk[0]})
        out += [{key: batch[key][i] for key in batch} for i in range(len(chunk))]
    return score_sets(eval_sets, out)
