import math

import pytest

from instune.eval.text_metrics import generation_scores, lcs_length, rouge_l, rouge_tokens


def test_rouge_tokens_lowercase_words_of_any_script():
    assert rouge_tokens("The Cat, sat! 12 Größe") == ["the", "cat", "sat", "12", "größe"]


@pytest.mark.parametrize("a,b,expected", [("abcbdab", "bdcaba", 4), ("abc", "", 0), ("abc", "abc", 3),
                                          ("axbycz", "abc", 3), ("abc", "cba", 1)])
def test_lcs_length(a, b, expected):
    assert lcs_length(list(a), list(b)) == expected
    assert lcs_length(list(b), list(a)) == expected


def test_rouge_l_f1_from_lcs():
    # LCS "the cat on mat" = 4 of 6 predicted and 4 of 5 reference tokens.
    score = rouge_l("the black cat sat on mat", "the cat lay on mat")
    precision, recall = 4 / 6, 4 / 5
    assert score == pytest.approx(2 * precision * recall / (precision + recall))
    assert rouge_l("same words here", "Same words, here.") == 1.0
    assert rouge_l("nothing shared", "other text") == 0.0
    assert rouge_l("", "") == 1.0 and rouge_l("", "x") == 0.0


def test_generation_scores_perfect_and_wrong():
    refs = ["The quick brown fox jumps over the lazy dog.", "A second reference sentence of several words."]
    perfect = generation_scores(list(refs), refs)
    assert perfect["exact_match"] == 1.0 and perfect["rouge_l"] == 1.0
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
    wrong = generation_scores(["zzz", "qqq"], refs)
    assert wrong["exact_match"] == 0.0 and wrong["rouge_l"] == 0.0 and wrong["bleu"] == 0.0
    assert wrong["chrf"] < 5


def test_generation_scores_exact_match_forgives_whitespace_and_final_period():
    scores = generation_scores([" 12. ", "13", "[1, 2]"], ["12", "12", "[1, 2]"])
    assert scores["exact_match"] == pytest.approx(2 / 3)


def test_generation_scores_empty_set_is_nan():
    assert all(math.isnan(v) for v in generation_scores([], []).values())
