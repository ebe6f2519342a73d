"""Generation metrics over a set: exact match, ROUGE-L, and corpus BLEU and chrF (sacrebleu).

Exact match and ROUGE-L are in [0, 1]; BLEU and chrF keep sacrebleu's 0-100 scale, as papers quote them.
"""

from __future__ import annotations

import re

from instune.default.corpus import check_answer

GENERATION_METRICS = ("exact_match", "rouge_l", "bleu", "chrf")


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased word tokens; like rouge-score's default tokenizer, but keeps letters of every script."""
    return re.findall(r"\w+", text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, one row of the dynamic programme at a time."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004) of one prediction: LCS-based precision and recall over word tokens."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = lcs_length(pred, ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def generation_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean exact match and ROUGE-L per example, corpus BLEU and chrF over the whole set."""
    import sacrebleu

    assert len(predictions) == len(references), "one prediction per reference"
    n = len(references)
    if n == 0:
        return {name: float("nan") for name in GENERATION_METRICS}
    return {
        "exact_match": sum(check_answer(p, r) for p, r in zip(predictions, references)) / n,
        "rouge_l": sum(rouge_l(p, r) for p, r in zip(predictions, references)) / n,
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
        "chrf": sacrebleu.corpus_chrf(predictions, [references]).score,
    }
