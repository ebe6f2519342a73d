"""Generation metrics of a vision-language model on image tasks: greedy answers scored per domain with the text
evaluation's metrics (text_metrics.generation_scores: exact match, ROUGE-L, BLEU, chrF)."""

from __future__ import annotations

import io

import torch

from instune.eval.text_metrics import generation_scores


def answer_scores(model, processor, examples: list[dict], max_new_tokens: int = 8, batch_size: int = 32
                  ) -> dict[str, dict[str, float]]:
    """{domain: {exact_match, rouge_l, bleu, chrf, examples}}; each example is {domain, messages (the user
    turn with <image>, then the reference answer), images: [PNG bytes]}."""
    from PIL import Image

    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"  # generation continues every row from its last real token
    answers: dict[str, tuple[list[str], list[str]]] = {}
    model.eval()
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        prompts = [tokenizer.apply_chat_template(e["messages"][:-1], tokenize=False, add_generation_prompt=True)
                   for e in chunk]
        images = [Image.open(io.BytesIO(png)).convert("RGB") for e in chunk for png in e["images"]]
        inputs = processor(images=images or None, text=prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        for example, row in zip(chunk, out[:, inputs["input_ids"].shape[1]:]):
            predictions, references = answers.setdefault(example["domain"], ([], []))
            predictions.append(tokenizer.decode(row, skip_special_tokens=True).strip())
            references.append(example["messages"][-1]["content"])
    return {d: {**generation_scores(p, r), "examples": len(r)} for d, (p, r) in answers.items()}
