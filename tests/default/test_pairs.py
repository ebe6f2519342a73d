"""Preference pairs from the verifiable-task corpus: the wrong answer keeps the right one's form."""

from __future__ import annotations

import json
import random
import re

from instune.default.corpus import check_answer, generate_corpus
from instune.default.pairs import pairs_from_alpaca, wrong_answer, write_preference_pairs


def test_wrong_answers_move_one_number_or_one_letter():
    rng = random.Random(0)
    for answer in ("12", "0", "[3, 1, 2]", '{"a": 1, "b": 2}', "a=1, b=2", "3000 m", "CAT", "cat cat", "c"):
        for _ in range(20):
            wrong = wrong_answer(answer, rng)
            assert wrong != answer and not check_answer(wrong, answer)
            assert len(re.findall(r"\d+", wrong)) == len(re.findall(r"\d+", answer))  # same form
            if not re.search(r"\d", answer):
                assert len(wrong) == len(answer) and sum(a != b for a, b in zip(wrong, answer)) == 1
    assert all(int(wrong_answer("0", rng)) > 0 for _ in range(20))  # never negative


def test_pairs_are_written_beside_the_corpus_one_per_alpaca_record(tmp_path):
    files = generate_corpus(tmp_path, ["arithmetic", "list_ops"], ["unit_conversion"], 20, 5, seed=0)
    path = write_preference_pairs(tmp_path, seed=0)
    pairs = [json.loads(line) for line in path.read_text().splitlines()]
    alpaca = [json.loads(line) for line in files.train_files["alpaca"].read_text().splitlines()]
    assert len(pairs) == len(alpaca) == 20
    assert [p["chosen"] for p in pairs] == [r["output"] for r in alpaca]
    assert all(p["chosen"] != p["rejected"] and p["domain"] in ("arithmetic", "list_ops") for p in pairs)
    assert pairs_from_alpaca(alpaca, seed=0) == pairs  # reproducible
