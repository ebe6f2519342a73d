"""Fitting one tokenized example into `max_length` tokens without training on nothing.

Cutting the right end keeps a long prompt and cuts the answer after it, whole or in part: 8 of the Alpaca
seed tasks lost their entire answer at 512 tokens and were trained on nothing, or dropped. `prompt_left`
(the default) keeps the answers instead:

1. when every labelled (answer) token fits in the last `max_length` tokens, the prompt is shortened from
   its left, so the model still sees the instruction's end and the whole answer;
2. otherwise (a multi-turn conversation whose answers together are too long), it keeps the longest run of
   whole turns from the start that ends with a complete answer;
3. otherwise no answer fits with any of its prompt, and the example is dropped with a reason.

`truncate` (cut the right end) and `drop` (drop anything too long) stay selectable.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100
TRUNCATIONS = ("prompt_left", "truncate", "drop")


def answer_runs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of each run of labelled tokens: one run per assistant turn."""
    labelled = np.r_[False, labels != IGNORE_INDEX, False].astype(np.int8)
    edges = np.diff(labelled)
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


def fit_tokens(ids: np.ndarray, labels: np.ndarray, max_length: int, truncation: str
               ) -> tuple[np.ndarray, np.ndarray] | str:
    """(ids, labels) cut to at most `max_length` tokens as `truncation` says, or the reason the example is dropped.

    The first token of a kept example is never a target (it would be "predicted" from the example before it in
    a packed bin), so a left cut always leaves at least one prompt token in front of the first answer.
    """
    assert truncation in TRUNCATIONS, f"truncation must be one of {TRUNCATIONS}, got {truncation!r}"
    if len(ids) > max_length:
        if truncation == "drop":
            return f"{len(ids)} tokens is over max_length {max_length}"
        if truncation == "truncate":
            ids, labels = ids[:max_length], labels[:max_length]
        else:
            fitted = _prompt_left(ids, labels, max_length)
            if isinstance(fitted, str):
                return fitted
            ids, labels = fitted
    if not (labels != IGNORE_INDEX).any():
        return "no assistant tokens left to train on (after truncation)"
    return ids, labels


def _prompt_left(ids: np.ndarray, labels: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray] | str:
    starts, ends = answer_runs(labels)
    if not len(starts):
        return "no assistant tokens to train on"
    cut = len(ids) - max_length
    if starts[0] > cut:  # every answer fits with at least one prompt token before the first
        return ids[cut:], labels[cut:]
    whole = ends[ends <= max_length]  # turns kept whole from the start, ending with a complete answer
    if len(whole):
        return ids[: whole[-1]], labels[: whole[-1]]
    answer = int(ends[-1] - starts[-1])
    return (f"{len(ids)} tokens is over max_length {max_length}, and no answer fits whole with part of its "
            f"prompt (the last answer alone is {answer} tokens)")
