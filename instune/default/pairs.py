"""Preference pairs from the verifiable-task corpus: the right answer (chosen) against a plausible wrong one.

A wrong answer keeps the right one's form, so the pair differs only in what is true: one number moved by 1 to
3 (sums, list items, counts, unit values, JSON values), or, for answers without numbers, one letter changed
or the case flipped. The pairs are written beside the corpus (pairs/train.jsonl) in the `pairs` format.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from instune.atomic import write_text

NUMBER = re.compile(r"\d+")


def wrong_answer(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer of the same form as `answer`, never equal to it."""
    numbers = list(NUMBER.finditer(answer))
    if numbers:
        match = rng.choice(numbers)
        value = int(match.group())
        moved = value + rng.choice([d for d in (-3, -2, -1, 1, 2, 3) if value + d >= 0])
        return answer[:match.start()] + str(moved) + answer[match.end():]
    letters = [i for i, c in enumerate(answer) if c.isalpha()]
    if not letters:
        return answer + answer[-1:] if answer else "?"
    i = rng.choice(letters)
    c = answer[i]
    replacement = chr((ord(c.lower()) - ord("a") + rng.randint(1, 25)) % 26 + ord("a"))
    return answer[:i] + (replacement.upper() if c.isupper() else replacement) + answer[i + 1:]


def pairs_from_alpaca(records: list[dict], seed: int) -> list[dict]:
    """One pair per Alpaca record: its prompt, its output as chosen, a wrong answer as rejected."""
    rng = random.Random(f"{seed}:pairs")
    pairs = []
    for record in records:
        prompt = f"{record['instruction']}\n\n{record['input']}" if record.get("input") else record["instruction"]
        pairs.append({"prompt": prompt, "chosen": record["output"], "rejected": wrong_answer(record["output"], rng),
                      "domain": record["domain"]})
    return pairs


def write_preference_pairs(corpus_dir: str | Path, seed: int = 0) -> Path:
    """pairs/train.jsonl from the corpus's train/alpaca.jsonl; returns its path (rewritten each time: fast)."""
    corpus_dir = Path(corpus_dir)
    records = [json.loads(line) for line in (corpus_dir / "train" / "alpaca.jsonl").read_text().splitlines()]
    path = corpus_dir / "pairs" / "train.jsonl"
    write_text(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs_from_alpaca(records, seed)))
    return path
