from instune.config import QualityFilterConfig
from instune.data.filters.quality import (
    check_quality,
    duplicate_line_char_fraction,
    duplicate_ngram_char_fraction,
    text_quality_problem,
    top_ngram_char_fraction,
)
from instune.data.schema import make_record

DEFAULTS = QualityFilterConfig().model_dump()

PROSE = (
    "Photosynthesis is the process plants use to turn light into chemical energy. Chlorophyll in the "
    "leaves absorbs mostly red and blue light, which is why leaves look green to us. The energy splits "
    "water molecules, releasing oxygen as a by-product, while carbon dioxide from the air is fixed into "
    "sugars through the Calvin cycle. Those sugars feed the plant, build cellulose for its cell walls, and "
    "ultimately supply almost every food chain on the planet with usable energy."
)
VOCABULARY = [f"token{chr(97 + i)}{chr(97 + j)}" for i in range(26) for j in range(26)]


def conversation(*assistant_answers: str, user: str = "Please answer.") -> dict:
    messages = []
    for answer in assistant_answers:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return make_record("src:f.jsonl:line 1", "src", "d", messages)


def problem(text: str) -> str | None:
    return text_quality_problem(text, **DEFAULTS)


def test_fluent_prose_and_short_verifiable_answers_pass():
    assert len(PROSE.split()) >= DEFAULTS["min_words"]
    assert problem(PROSE) is None
    for answer in ("12", '{"a": 1}', "[3, 1, 2]", "olleh", "5000 m"):
        assert check_quality(conversation(answer), **DEFAULTS) is None


def test_number_lists_and_worked_arithmetic_are_not_judged_by_word_rules():
    numbers = "[" + ", ".join(str(i) for i in range(80)) + "]"
    arithmetic = " ".join(f"{i} + {i} = {2 * i}." for i in range(30))
    assert problem(numbers) is None
    assert problem(arithmetic) is None


def test_refusal_phrase_is_caught_in_any_length_and_casing():
    record = conversation("Sure, 4.", "As an AI  language model, I cannot browse the web.")
    assert check_quality(record, **DEFAULTS) == (
        "assistant message 3: contains the boilerplate phrase 'as an ai language model, i cannot'"
    )
    curly = "I\u2019m sorry, but I cannot help with that."
    assert problem(curly) == "contains the boilerplate phrase 'i'm sorry, but i cannot'"
    assert text_quality_problem(curly, **{**DEFAULTS, "refusal_phrases": []}) is None


def test_user_messages_are_not_judged():
    record = make_record("s:f:1", "s", "d", [
        {"role": "user", "content": "As an AI language model, rewrite this."},
        {"role": "assistant", "content": "Done."},
    ])
    assert check_quality(record, **DEFAULTS) is None


def test_mean_word_length_bounds():
    short_words = " ".join(["a", "b", "c", "d", "e", "f"] * 10)
    assert problem(short_words) == "mean word length 1.0 is below 2.5"
    long_words = " ".join(f"supercalifragilistic{i}" for i in range(60))
    assert problem(long_words).startswith("mean word length 21.") and "is above 12.0" in problem(long_words)


def test_symbol_to_word_ratio():
    hashed = " ".join(f"#{w}" if i % 3 == 0 else w for i, w in enumerate(VOCABULARY[:60]))
    assert problem(hashed) == "symbol-to-word ratio 0.33 is above 0.2"


def test_non_alphabetic_word_fraction():
    mostly_numbers = " ".join(VOCABULARY[:50] + [str(1000 + i) for i in range(250)])
    assert problem(mostly_numbers) == "83% of words have no letter, above 80%"


def test_duplicate_lines():
    lines = [" ".join(VOCABULARY[i * 12 : (i + 1) * 12]) for i in range(5)]
    text = "\n".join(lines + lines[:2])
    assert abs(duplicate_line_char_fraction(text) - 2 / 7) < 1e-9
    assert problem(text) == "29% of characters are in repeated lines, above 20%"


def test_top_ngram_fraction():
    text = " ".join(f"{w} very good" for w in VOCABULARY[:30])
    # "very good": 8 word characters x 30 over 30 x 15 in all.
    assert problem(text) == "the most frequent 2-gram covers 53% of characters, above 40%"
    assert top_ngram_char_fraction("a b c d".split(), 2) == 0.0  # nothing repeats


def test_duplicate_ngram_fraction():
    words = VOCABULARY[:45]
    text = " ".join(words + words[:20])
    reason = problem(text)
    assert reason.startswith("repeated 5-grams cover 3") and reason.endswith("above 30%")
    assert duplicate_ngram_char_fraction("x y z".split(), 5) == 0.0


def test_degenerate_loop_is_caught_by_defaults():
    loop = "I think the answer is correct and complete. " * 12
    assert problem(loop) is not None


# ---- the array-based n-gram rules against the plain tuple-based definitions they replace


def reference_top(words: list[str], n: int) -> float:
    from collections import Counter

    total = sum(len(w) for w in words)
    if len(words) < n or not total:
        return 0.0
    gram, count = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1)).most_common(1)[0]
    return 0.0 if count < 2 else min(1.0, sum(len(w) for w in gram) * count / total)


def reference_duplicate(words: list[str], n: int) -> float:
    total = sum(len(w) for w in words)
    if len(words) < n or not total:
        return 0.0
    seen, repeated, i = set(), 0, 0
    while i <= len(words) - n:
        gram = tuple(words[i : i + n])
        if gram in seen:
            repeated += sum(len(w) for w in gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return repeated / total


def test_ngram_rules_equal_their_tuple_definitions_on_repetitive_and_real_text():
    import json
    import random
    from pathlib import Path

    rng = random.Random(0)
    texts = []
    for _ in range(300):  # small vocabularies repeat n-grams often, with ties between equally frequent ones
        vocab = [f"w{k}" * rng.randint(1, 3) for k in range(rng.randint(2, 12))]
        texts.append(" ".join(rng.choices(vocab, k=rng.randint(0, 80))))
    shared = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "alpaca_seed_tasks.jsonl"
    if shared.is_file():
        for line in shared.read_text().splitlines():
            texts += [i["output"] for i in json.loads(line)["instances"]]
    for text in texts:
        words = text.lower().split()
        for n in (1, 2, 3, 5, 7):
            assert top_ngram_char_fraction(words, n) == reference_top(words, n), (text, n)
            assert duplicate_ngram_char_fraction(words, n) == reference_duplicate(words, n), (text, n)


def test_prose_words_are_the_words_with_a_letter():
    from instune.data.filters.quality import _PROSE_WORD

    text = "Étude 12 x=3 ½ ⅻ ² naïve\t{\"a\": 1}\n\n--- 9b ... 你好 _ a_b 3.14 Ⅻ"
    assert _PROSE_WORD.findall(text) == [w for w in text.split() if any(ch.isalpha() for ch in w)]
    assert len(_PROSE_WORD.findall("1" * 200_000 + " a")) == 1  # a long run without letters stays linear


# ---- chat-data defaults: refusals only, code / tables / lists out of the repetition rules

USERS = [(1, "Ann"), (2, "Bob"), (3, "Cid"), (4, "Dee"), (5, "Eve"), (6, "Fay"), (7, "Gus"), (8, "Hal")]
CODE_ANSWER = (
    "Here is a script that creates the table and fills it with the sample users you listed, one row each.\n\n"
    "```sql\nCREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT UNIQUE);\n"
    + "\n".join(f"INSERT INTO users (id, name, email) VALUES ({i}, '{n}', '{n.lower()}@example.com');"
                for i, n in USERS)
    + "\n```\n\nRun it once against an empty database; the unique constraint on the email column makes a "
    "second run fail instead of adding the same users twice."
)
SHIFTS = [("Ann", "early shift", "late shift"), ("Bob", "late shift", "early shift"),
          ("Cid", "early shift", "late shift"), ("Dee", "late shift", "early shift"),
          ("Eve", "early shift", "late shift"), ("Fay", "late shift", "early shift")]
TABLE_ANSWER = (
    "Here is the weekly schedule for the team, with the shift each person covers on each working day.\n\n"
    "| name | Monday | Tuesday | Wednesday | Thursday | Friday |\n|---|---|---|---|---|---|\n"
    + "\n".join(f"| {name} | {a} | {a} | {b} | {a} | {b} |" for name, a, b in SHIFTS)
    + "\n\nEveryone works both kinds of shift each week, so nobody is stuck with only late evenings for the month."
)


def test_code_blocks_and_tables_are_left_out_of_repetition_rules():
    # Without the chat defaults both fall to Gopher's repetition rules, though nothing in them is degenerate.
    web = {**DEFAULTS, "skip_code_and_tables": False}
    assert text_quality_problem(CODE_ANSWER, **web) == "repeated 7-grams cover 32% of characters, above 25%"
    assert text_quality_problem(TABLE_ANSWER, **web) == "repeated 5-grams cover 45% of characters, above 30%"
    assert DEFAULTS["skip_code_and_tables"] is True
    assert problem(CODE_ANSWER) is None and problem(TABLE_ANSWER) is None
    # A degenerate loop outside the code block is still caught.
    loop = CODE_ANSWER + "\n" + "I think the answer is correct and complete. " * 12
    assert problem(loop) == "repeated 5-grams cover 60% of characters, above 30%"


def test_repetition_text_drops_fences_tables_and_list_markers():
    from instune.data.filters.quality import repetition_text

    text = "intro\n```js\nx();\nx();\n```\nmid\n~~~\nunclosed\n| a | b |\n|:-:|---|\n- one\n2) two\n  * three"
    assert repetition_text(text) == "intro\nmid"
    assert repetition_text("- one\n2) two\n  * three\n3.5 is a number") == "one\ntwo\nthree\n3.5 is a number"


def test_refusals_are_rejected_and_identity_answers_are_kept():
    identity = "As a language model, I go by the name Vicuna and was trained by researchers from LMSYS."
    assert problem(identity) is None
    assert problem("As an AI language model, I don't have opinions, but here are both sides.") is None
    assert problem("As an AI language model, I can't browse the internet.") == \
        "contains the boilerplate phrase 'as an ai language model, i can't'"
