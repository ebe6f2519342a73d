"""Per-set evaluation of one model: loss on the reference answers, and exact match from greedy generation."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from instune.data.tokenize import IGNORE_INDEX, Tokenized, tokenize_batch
from instune.default.corpus import check_answer


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
    loss: float
    perplexity: float
    exact_match: float

    def to_dict(self) -> dict:
        return asdict(self)


def split_prompt(messages: list[dict]) -> tuple[list[dict], str]:
    """(messages before the last assistant turn, that turn's content)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def reference_loss(model, tokenizer, records: list[dict], max_length: int, batch_size: int) -> float:
    """Token-weighted loss over every assistant token of the records (teacher forcing)."""
    from instune.train.loop import token_loss_sum

    tokenized = [t for t in tokenize_batch([r["messages"] for r in records], tokenizer, max_length, "truncate")
                 if isinstance(t, Tokenized)]
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(tokenized), batch_size):
        chunk = tokenized[start:start + batch_size]
        width = max(len(t.input_ids) for t in chunk)
        pad = tokenizer.pad_token_id
        batch = {
            "input_ids": torch.tensor([t.input_ids + [pad] * (width - len(t.input_ids)) for t in chunk]),
            "labels": torch.tensor([t.labels + [IGNORE_INDEX] * (width - len(t.labels)) for t in chunk]),
            "position_ids": torch.tensor([list(range(width)) for _ in chunk]),
        }
        batch = {k: v.to(model.device) for k, v in batch.items()}
        loss_sum += float(token_loss_sum(model, batch))
        tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return loss_sum / max(tokens, 1)


def generate_answers(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int,
                     batch_size: int) -> list[str]:
    """Greedy answers, batched with left padding so every prompt ends where generation starts."""
    tokenizer.padding_side = "left"
    answers = []
    for start in range(0, len(prompts), batch_size):
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 for p in prompts[start:start + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


def evaluate_model(model_path: str, eval_sets: list[EvalSet], *, max_length: int, max_new_tokens: int,
                   batch_size: int) -> list[SetResult]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    model.eval()
    results = []
    with torch.no_grad():
        for s in eval_sets:
            loss = reference_loss(model, tokenizer, s.records, max_length, batch_size)
            prompts, references = zip(*(split_prompt(r["messages"]) for r in s.records))
            answers = generate_answers(model, tokenizer, list(prompts), max_new_tokens, batch_size)
            correct = sum(check_answer(a, ref) for a, ref in zip(answers, references))
            results.append(SetResult(s.name, s.domain, s.kind, len(s.records), loss,
                                     math.exp(min(loss, 50)), correct / max(len(s.records), 1)))
    return results
