import json
import random
import re
from pathlib import Path

import pytest

from instune.default.corpus import DOMAINS, check_answer, generate_corpus
from instune.errors import UserError

IN_DOMAIN = ["arithmetic", "list_ops", "string_edit"]
OUT_OF_DOMAIN = ["unit_conversion", "format_conversion"]
TRAIN_PER_DOMAIN = 120
EVAL_PER_DOMAIN = 30


def _generate(out_dir, seed=0, **overrides):
    args = dict(
        in_domain=IN_DOMAIN,
        out_of_domain=OUT_OF_DOMAIN,
        train_per_domain=TRAIN_PER_DOMAIN,
        eval_per_domain=EVAL_PER_DOMAIN,
        seed=seed,
    )
    return generate_corpus(out_dir, **(args | overrides))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _prompt(instruction: str, input_: str) -> str:
    return f"{instruction}\n\n{input_}" if input_ else instruction


def _train_examples(files) -> list[tuple[str, str, str]]:
    """(domain, prompt, answer) for every training record, from both formats."""
    examples = [
        (r["domain"], _prompt(r["instruction"], r["input"]), r["output"])
        for r in _read_jsonl(files.train_files["alpaca"])
    ]
    for r in _read_jsonl(files.train_files["sharegpt"]):
        human, gpt = r["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        examples.append((r["domain"], human["value"], gpt["value"]))
    return examples


def _eval_examples(files) -> list[tuple[str, str, str]]:
    return [
        (r["domain"], _prompt(r["instruction"], r["input"]), r["output"])
        for path in files.eval_files.values()
        for r in _read_jsonl(path)
    ]


# Independent solvers: each reads the prompt text the way a person would and computes the answer.
def _solve_arithmetic(text):
    a, b = map(int, re.findall(r"\d+", text))
    return str(a - b if ("-" in text or "minus" in text) else a + b)


def _solve_list_ops(text):
    numbers = list(map(int, re.findall(r"\d+", text)))
    lowered = text.lower()
    if any(w in lowered for w in ("largest", "biggest", "maximum")):
        return str(max(numbers))
    if any(w in lowered for w in ("smallest", "lowest", "minimum")):
        return str(min(numbers))
    if "how many" in lowered or "count" in lowered:
        return str(len(numbers))
    return str(numbers[0] if "first" in lowered else numbers[-1])


def _solve_string_edit(text):
    quoted = re.search(r"'(\w+)'", text)
    word = quoted.group(1) if quoted else text.split()[-1]
    if "upper" in text or "capital" in text:
        return word.upper()
    if "lower" in text or "small" in text:
        return word.lower()
    if "twice" in text or "two times" in text:
        return f"{word} {word}"
    return word[0]


def _solve_unit_conversion(text):
    to_base = {"km": 1000, "m": 1, "kg": 1000, "g": 1, "h": 60, "min": 1}
    partner = {"km": "m", "m": "km", "kg": "g", "g": "kg", "h": "min", "min": "h"}
    amount, src = re.search(r"(\d+) (km|m|kg|g|h|min)\b", text).groups()
    dst = partner[src]
    return f"{int(amount) * to_base[src] // to_base[dst]} {dst}"


def _solve_format_conversion(text):
    if "{" in text:
        obj = json.loads(re.search(r"\{.*\}", text).group(0))
        return ", ".join(f"{k}={v}" for k, v in obj.items())
    if "=" in text:
        return json.dumps({k: int(v) for k, v in re.findall(r"(\w)=(\d+)", text)})
    return json.dumps([int(n) for n in re.search(r"\d+(?:,\d+)+", text).group(0).split(",")])


SOLVERS = {
    "arithmetic": _solve_arithmetic,
    "list_ops": _solve_list_ops,
    "string_edit": _solve_string_edit,
    "unit_conversion": _solve_unit_conversion,
    "format_conversion": _solve_format_conversion,
}


def _phrasing(instruction: str) -> str:
    """The instruction with its data replaced by placeholders, leaving only the wording."""
    text = re.sub(r"\{.*\}", "J", instruction)
    text = re.sub(r"'[^']*'", "Q", text)
    text = re.sub(r"\w=\d+(, \w=\d+)*", "KV", text)
    text = re.sub(r"\d+((, |,)\d+)*", "N", text)
    text = re.sub(r"\b(km|m|kg|g|h|min)\b", "U", text)
    return re.sub(r"\b(plus|minus)\b|[+-]", "OP", text)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _generate(tmp_path_factory.mktemp("corpus"))


def test_same_seed_gives_same_bytes_and_other_seed_differs(tmp_path, corpus):
    again = _generate(tmp_path / "again")
    other = _generate(tmp_path / "other", seed=1)
    names = [*corpus.train_files, *corpus.eval_files]
    paths = {**corpus.train_files, **corpus.eval_files}
    again_paths = {**again.train_files, **again.eval_files}
    other_paths = {**other.train_files, **other.eval_files}
    for name in names:
        assert paths[name].read_bytes() == again_paths[name].read_bytes(), name
        assert paths[name].read_bytes() != other_paths[name].read_bytes(), name


def test_counts_per_domain_and_both_formats_hold_every_in_domain_domain(corpus):
    train_domains = [domain for domain, _, _ in _train_examples(corpus)]
    assert {d: train_domains.count(d) for d in IN_DOMAIN} == {d: TRAIN_PER_DOMAIN for d in IN_DOMAIN}
    for name in ("alpaca", "sharegpt"):
        assert {r["domain"] for r in _read_jsonl(corpus.train_files[name])} == set(IN_DOMAIN), name
    assert sorted(corpus.eval_files) == sorted(IN_DOMAIN + OUT_OF_DOMAIN)
    for domain, path in corpus.eval_files.items():
        records = _read_jsonl(path)
        assert len(records) == EVAL_PER_DOMAIN
        assert {r["domain"] for r in records} == {domain}
        assert set(records[0]) == {"instruction", "input", "output", "domain"}


def test_out_of_domain_domains_never_appear_in_training(corpus):
    train_domains = {domain for domain, _, _ in _train_examples(corpus)}
    assert train_domains == set(IN_DOMAIN)
    train_text = "".join(path.read_text() for path in corpus.train_files.values())
    assert "unit_conversion" not in train_text and " km" not in train_text and "JSON" not in train_text


def test_no_eval_prompt_appears_in_training_or_twice_in_eval(corpus):
    train_prompts = {prompt for _, prompt, _ in _train_examples(corpus)}
    eval_prompts = [prompt for _, prompt, _ in _eval_examples(corpus)]
    assert not train_prompts & set(eval_prompts)
    assert len(eval_prompts) == len(set(eval_prompts))


def test_every_answer_matches_an_independent_solver(corpus):
    examples = _train_examples(corpus) + _eval_examples(corpus)
    assert len(examples) == 3 * TRAIN_PER_DOMAIN + 5 * EVAL_PER_DOMAIN
    for domain, prompt, answer in examples:
        assert SOLVERS[domain](prompt) == answer, (domain, prompt, answer)


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_each_domain_has_at_least_six_phrasings_with_short_answers(domain):
    rng = random.Random(0)
    records = [DOMAINS[domain](rng) for _ in range(2000)]
    phrasings = {_phrasing(instruction) for instruction, _, _ in records}
    # The upper bound proves the placeholders really strip the data, so the lower bound means something.
    assert 6 <= len(phrasings) <= 20, sorted(phrasings)
    assert all(SOLVERS[domain](_prompt(i, x)) == out for i, x, out in records)
    assert max(len(instruction) + len(input_) for instruction, input_, _ in records) < 80


def test_existing_corpus_with_same_parameters_is_reused_not_rewritten(tmp_path):
    first = _generate(tmp_path)
    inodes = {path: path.stat().st_ino for path in [*first.train_files.values(), *first.eval_files.values()]}
    second = _generate(tmp_path)
    assert second == first
    assert {path: path.stat().st_ino for path in inodes} == inodes

    third = _generate(tmp_path, seed=3, out_of_domain=["unit_conversion"])
    assert third.train_files["alpaca"].stat().st_ino != inodes[first.train_files["alpaca"]]
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == sorted(f"{d}.jsonl" for d in third.eval_files)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["parameters"]["seed"] == 3
    assert manifest["records"]["eval/unit_conversion.jsonl"] == EVAL_PER_DOMAIN


def test_unknown_domain_is_a_user_error_listing_the_valid_ones(tmp_path):
    with pytest.raises(UserError) as error:
        _generate(tmp_path, out_of_domain=["unit_conversion", "poetry"])
    message = str(error.value)
    assert "corpus.out_of_domain" in message and "'poetry'" in message
    assert all(name in message for name in DOMAINS)
    assert "\n" not in message
    assert not (tmp_path / "manifest.json").exists()


def test_domain_in_both_lists_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="arithmetic is also in corpus.in_domain"):
        _generate(tmp_path, out_of_domain=["arithmetic"])


def test_eval_prompts_exhausted_by_training_is_a_user_error(tmp_path):
    # string_edit has about 1300 distinct prompts; 20000 training draws leave none unseen.
    with pytest.raises(UserError, match="corpus.eval_per_domain: found only 0 of 30 'string_edit'"):
        _generate(tmp_path, in_domain=["string_edit"], out_of_domain=[], train_per_domain=20000)


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("12", "12", True),
        ("  12.\n", "12", True),
        ("CAT", "CAT.", True),
        ('{"a": 1, "b": 2}', ' {"a": 1, "b": 2}', True),
        ("12..", "12", False),
        ("13", "12", False),
        ("cat", "CAT", False),
        ("", "0", False),
        ("3000m", "3000 m", False),
    ],
)
def test_check_answer(prediction, reference, expected):
    assert check_answer(prediction, reference) is expected
