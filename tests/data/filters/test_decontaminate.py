import subprocess
import sys

from instune.data.filters.decontaminate import build_ngram_index, check_contamination, ngram_hashes, words
from instune.data.schema import make_record

EVAL_PASSAGE = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)


def conversation(user: str, assistant: str) -> dict:
    return make_record("src:f.jsonl:line 1", "src", "d", [
        {"role": "user", "content": user}, {"role": "assistant", "content": assistant},
    ])


def test_ngram_hashes_are_order_sensitive_and_count_windows():
    tokens = words("The quick brown fox jumps over the lazy dog")
    assert tokens[:3] == ["the", "quick", "brown"]
    assert len(ngram_hashes(tokens, 3)) == 7
    assert len(set(ngram_hashes(tokens, 3).tolist())) == 7
    assert ngram_hashes(["a", "b"], 2)[0] != ngram_hashes(["b", "a"], 2)[0]
    # Shorter than n: one hash of the whole text; empty: none.
    assert len(ngram_hashes(["a", "b"], 13)) == 1
    assert len(ngram_hashes([], 13)) == 0


def test_hashes_are_the_same_in_another_process():
    # Ray workers are other processes; Python's hash() would differ there, ours must not.
    here = ngram_hashes(words(EVAL_PASSAGE), 13).tolist()
    code = (
        "from instune.data.filters.decontaminate import ngram_hashes, words;"
        f"print(ngram_hashes(words({EVAL_PASSAGE!r}), 13).tolist())"
    )
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert there.strip() == str(here)


def test_shared_13_gram_is_caught_despite_case_and_punctuation():
    index = build_ngram_index([EVAL_PASSAGE], 13)
    assert len(index) == len(words(EVAL_PASSAGE)) - 12
    leaked = conversation(
        "Here is a puzzle: NATALIA sold clips to 48 of her friends in April -- and then she sold half as many!",
        "72",
    )
    reason = check_contamination(leaked, index, 13)
    assert reason == (
        "shares a 13-word n-gram with an eval text: 'natalia sold clips to 48 of her friends in april and then she'"
    )


def test_unrelated_and_partially_overlapping_records_are_kept():
    index = build_ngram_index([EVAL_PASSAGE], 13)
    assert check_contamination(conversation("What is 7 + 5?", "12"), index, 13) is None
    # Twelve shared words in a row is one short of an n-gram.
    twelve = "natalia sold clips to 48 of her friends in april and then he bought pens"
    assert check_contamination(conversation(twelve, "ok"), index, 13) is None
    assert check_contamination(conversation(EVAL_PASSAGE, "72"), set(), 13) is None


def test_short_eval_prompt_is_caught_only_as_a_whole_message():
    index = build_ngram_index(["What is 17 + 25?"], 13)
    assert check_contamination(conversation("what is 17+25", "42"), index, 13) == (
        "message 0 equals an eval text: 'what is 17 25'"
    )
    assert check_contamination(conversation("What is 17 + 26?", "43"), index, 13) is None
    assert check_contamination(conversation("So, what is 17 + 25?", "42"), index, 13) is None


def test_batch_ngram_hashes_equal_per_text_hashes():
    """The one-pass batch version (MinHash uses it) gives every text's n-gram hashes, short texts included."""
    import random

    import numpy as np

    from instune.data.filters.decontaminate import batch_ngram_hashes, ngram_hashes

    rng = random.Random(1)
    for _ in range(300):
        lists = [[rng.choice("abcdefg") for _ in range(rng.choice([0, 0, 1, 2, 3, 4, 5, 6, 9, 20]))]
                 for _ in range(rng.randint(0, 12))]
        for n in (1, 2, 5):
            got, counts = batch_ngram_hashes(lists, n)
            want = [ngram_hashes(tokens, n) for tokens in lists]
            assert counts.tolist() == [len(w) for w in want]
            assert got.tolist() == (np.concatenate(want).tolist() if want else [])
