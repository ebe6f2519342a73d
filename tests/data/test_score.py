"""Reference-model scoring: IFD and perplexity values, per-source selection, and the scoring actor itself.

The selection through Ray (stage "score" in the quarantine and the accounting) is checked end to end in
test_prepare.py.
"""

import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from instune.data.score import (
    SCORE_COLUMN,
    ReferenceScorer,
    answer_only,
    best_is_highest,
    length_batches,
    score_from_losses,
    score_reason,
    top_cutoffs,
)
from instune.data.tokenize import IGNORE_INDEX, Tokenized, tokenize_batch
from instune.train.loop import count_targets, token_loss_sum


def test_ifd_is_the_conditioned_over_the_unconditioned_loss_on_the_same_tokens():
    conditioned, alone = np.array([9.0, 2.0, 3.0]), np.array([2.0, 4.0])
    scores = score_from_losses("ifd", conditioned, alone)
    # The first answer token has no context when the answer stands alone, so neither side counts it.
    assert scores["ifd"] == pytest.approx(2.5 / 3.0)
    assert scores["perplexity"] == pytest.approx(math.exp(14.0 / 3))
    assert score_from_losses("perplexity", conditioned) == {"perplexity": pytest.approx(math.exp(14.0 / 3))}
    assert score_from_losses("ifd", np.array([]), alone) == {}
    assert score_from_losses("ifd", np.array([1.0]), np.array([])) == {}


def test_answer_only_keeps_the_labelled_tokens():
    example = Tokenized([1, 2, 3, 4, 5, 6], [IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX, 6])
    assert answer_only(example) == Tokenized([3, 4, 6], [IGNORE_INDEX, 4, 6])


def test_best_end_defaults_to_high_ifd_and_low_perplexity():
    assert best_is_highest("ifd", None) and not best_is_highest("perplexity", None)
    assert not best_is_highest("ifd", "lowest") and best_is_highest("perplexity", "highest")


def test_top_cutoffs_per_source_after_thresholds():
    scores = {"a": np.array([0.1, 0.5, 0.9, 0.7, np.nan, 1.4]), "b": np.array([3.0, 1.0])}
    # "a": 0.1, 0.5, 0.7, 0.9 lie within [0, 1]; the best ceil(0.5 * 4) = 2 are 0.9 and 0.7.
    assert top_cutoffs(scores, 0.5, True, 0.0, 1.0) == {"a": 0.7, "b": 1.0}
    assert top_cutoffs(scores, 0.5, False, 0.0, 1.0) == {"a": 0.5, "b": 1.0}
    assert top_cutoffs({"c": np.array([np.nan])}, 0.5, True, None, None) == {}


def test_score_reasons_name_the_metric_and_score():
    common = dict(min_score=0.2, max_score=1.0, top_fraction=0.5, cutoff=0.7, highest=True)
    assert score_reason("ifd", 0.1, "a", **common) == "ifd 0.1000 is below min_score 0.2"
    assert score_reason("ifd", 1.2, "a", **common) == "ifd 1.2000 is above max_score 1.0"
    assert score_reason("ifd", 0.5, "a", **common) == \
        "ifd 0.5000 is not in the highest 50% of source 'a' (cutoff 0.7000)"
    assert score_reason("ifd", 0.7, "a", **common) is None  # the cutoff itself is kept
    assert score_reason("ifd", float("nan"), "a", **common) is None  # unscored records are kept
    lowest = dict(common, highest=False, cutoff=0.5)
    assert score_reason("perplexity", 0.6, "a", **lowest).startswith("perplexity 0.6000 is not in the lowest 50%")


CONVERSATIONS = [
    [{"role": "user", "content": "What is 7 + 5?"}, {"role": "assistant", "content": "12"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse the list [3, 1, 2]."},
     {"role": "assistant", "content": "[2, 1, 3]"}, {"role": "user", "content": "Sort it."},
     {"role": "assistant", "content": "[1, 2, 3]"}],
    [{"role": "user", "content": "Convert 5 km to miles, and show the working in full detail."},
     {"role": "assistant", "content": "5 km is about 3.11 miles."}],
    # The answer alone is longer than max_length: it cannot be kept whole, so there is nothing to score.
    [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": "word " * 200}],
]


def mean_loss(model, input_ids: list[int], labels: list[int]) -> float:
    """The mean target loss of one unpadded example, through the training loss function."""
    batch = {"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels]),
             "position_ids": torch.arange(len(input_ids))[None]}
    with torch.no_grad():
        return float(token_loss_sum(model, batch)) / count_targets(batch)


def expected_scores(model, tokenizer, messages) -> tuple[float, float]:
    """(IFD, perplexity) worked out one example at a time."""
    [t] = tokenize_batch([messages], tokenizer, 64, "prompt_left")  # as training truncates by default
    answer = [i for i, label in zip(t.input_ids, t.labels) if label != IGNORE_INDEX]
    first = next(k for k, label in enumerate(t.labels) if label != IGNORE_INDEX)
    given_prompt = mean_loss(model, t.input_ids, t.labels[:first] + [IGNORE_INDEX] + t.labels[first + 1:])
    alone = mean_loss(model, answer, [IGNORE_INDEX] + answer[1:])
    return given_prompt / alone, math.exp(mean_loss(model, t.input_ids, t.labels))


def test_scorer_matches_unbatched_losses_and_fills_metadata(model_dir):
    scorer = ReferenceScorer(model_dir, model_dir, "ifd", max_length=64, batch_size=3, max_batch_tokens=4096)
    messages_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    batch = pa.table({"source": ["s"] * 4, "messages": pa.array(CONVERSATIONS, messages_type),
                      "metadata": [json.dumps({"task": "t"})] * 4})
    out = scorer(batch)
    scores = out[SCORE_COLUMN].to_pylist()
    for messages, score, metadata in zip(CONVERSATIONS[:3], scores, out["metadata"].to_pylist()):
        ifd, perplexity = expected_scores(scorer.model, scorer.tokenizer, messages)
        # Padding in a batch of different lengths must not change any example's loss.
        assert score == pytest.approx(ifd, abs=1e-5)
        assert json.loads(metadata) == {"task": "t", "ifd": pytest.approx(score, abs=1e-5),
                                        "perplexity": pytest.approx(perplexity, rel=1e-4)}
    assert math.isnan(scores[3]) and json.loads(out["metadata"][3].as_py()) == {"task": "t"}


def test_perplexity_scorer_skips_the_second_pass(model_dir):
    scorer = ReferenceScorer(model_dir, model_dir, "perplexity", max_length=64, batch_size=8,
                             max_batch_tokens=4096)
    messages_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    out = scorer(pa.table({"source": ["s"], "messages": pa.array(CONVERSATIONS[:1], messages_type),
                           "metadata": [""]}))
    expected = expected_scores(scorer.model, scorer.tokenizer, CONVERSATIONS[0])[1]
    assert out[SCORE_COLUMN][0].as_py() == pytest.approx(expected, rel=1e-4)
    assert set(json.loads(out["metadata"][0].as_py())) == {"perplexity"}


def test_length_batches_cap_examples_and_padded_tokens():
    lengths = [50, 10, 12, 400, 11, 30, 31, 900]
    groups = length_batches(lengths, max_examples=3, max_tokens=100)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # each example once
    assert groups == [[1, 4, 2], [5, 6], [0], [3], [7]]  # shortest first; 3 x 50 > 100; alone when too long

