"""The embedded corpus: short instruction tasks whose answers a program can check, in five domains.

Each domain is a function `(rng) -> (instruction, input, output)`. Prompts are short, answers are a few
tokens and the vocabulary is small, so a tiny randomly initialised model can learn them in minutes; each
domain still has many phrasings, so eval measures more than memorised templates. `generate_corpus` writes
the in-domain training records half as Alpaca, half as ShareGPT (the quickstart reads both real formats),
and one Alpaca eval file per domain with prompts never seen in training.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from instune.atomic import write_json, write_text
from instune.errors import UserError

# Bump when a generator or template changes, so a corpus cached under the old version is rebuilt.
GENERATOR_VERSION = 1

# Short common words: a few BPE tokens each, so answers stay 1-6 tokens long.
WORDS = (
    "cat", "dog", "sun", "red", "box", "cup", "hat", "pen", "map", "car", "bus", "egg", "fish", "bird",
    "tree", "book", "door", "milk", "cake", "rain", "snow", "star", "moon", "ship", "bell", "lamp", "ring",
    "coin", "rose", "frog", "duck", "lion", "bear", "wolf", "goat", "cow", "pig", "fox", "owl", "bee", "ant",
    "hen", "road", "hill", "lake", "sea", "sand", "rock", "leaf", "seed", "corn", "rice", "bread", "apple",
    "plum", "pear", "lime", "salt", "tea", "soup", "bed", "desk", "sofa", "wall", "roof", "key", "bag",
    "shoe", "sock", "coat", "king", "queen", "baby", "girl", "boy", "home", "town", "park", "blue", "green",
)

# Templates are (instruction, input) pairs; an empty input means the data sits inside the instruction.
ARITHMETIC_TEMPLATES = (
    ("What is {a} {sym} {b}?", ""),
    ("Compute {a} {sym} {b}.", ""),
    ("What is {a} {word} {b}?", ""),
    ("Calculate {a} {word} {b}.", ""),
    ("{a} {sym} {b} = ?", ""),
    ("Give the answer to {a} {sym} {b}.", ""),
    ("Find the value of {a} {word} {b}.", ""),
    ("Evaluate the expression.", "{a} {sym} {b}"),
    ("Work out this sum and reply with the number only.", "{a} {word} {b}"),
)

LIST_TEMPLATES = {
    "max": (
        ("What is the largest number in {nums}?", ""),
        ("Which number is the biggest: {nums}?", ""),
        ("Find the maximum of these numbers.", "{nums}"),
    ),
    "min": (
        ("What is the smallest number in {nums}?", ""),
        ("Which number is the lowest: {nums}?", ""),
        ("Find the minimum of these numbers.", "{nums}"),
    ),
    "count": (
        ("How many numbers are in {nums}?", ""),
        ("Count the numbers in this list: {nums}.", ""),
        ("Count the items.", "{nums}"),
    ),
    "first": (("What is the first number in {nums}?", ""), ("Give the first item of the list.", "{nums}")),
    "last": (("What is the last number in {nums}?", ""), ("Give the last item of the list.", "{nums}")),
}
LIST_ANSWERS = {"max": max, "min": min, "count": len, "first": lambda xs: xs[0], "last": lambda xs: xs[-1]}

STRING_TEMPLATES = {
    "upper": (
        ("Write '{word}' in capital letters.", ""),
        ("Convert '{word}' to uppercase.", ""),
        ("Spell '{word}' in uppercase letters.", ""),
        ("Make this word uppercase.", "{word}"),
    ),
    "lower": (
        ("Write '{word}' in small letters.", ""),
        ("Convert '{word}' to lowercase.", ""),
        ("Spell '{word}' in lowercase letters.", ""),
        ("Make this word lowercase.", "{word}"),
    ),
    "repeat": (
        ("Repeat the word '{word}' twice.", ""),
        ("Say '{word}' two times.", ""),
        ("Write '{word}' twice with a space between.", ""),
        ("Write this word two times, separated by a space.", "{word}"),
    ),
    "first_letter": (
        ("What is the first letter of '{word}'?", ""),
        ("Give the first letter of the word '{word}'.", ""),
        ("Which letter does '{word}' start with?", ""),
        ("Reply with the first letter of this word.", "{word}"),
    ),
}

# (larger unit, smaller unit, smaller units per larger unit)
UNITS = (("km", "m", 1000), ("kg", "g", 1000), ("h", "min", 60))
UNIT_TEMPLATES = (
    ("Convert {n} {src} to {dst}.", ""),
    ("How many {dst} is {n} {src}?", ""),
    ("Express {n} {src} in {dst}.", ""),
    ("What is {n} {src} in {dst}?", ""),
    ("Change {n} {src} into {dst}.", ""),
    ("{n} {src} equals how many {dst}?", ""),
    ("Please convert {n} {src} into {dst}.", ""),
    ("Convert this quantity to {dst}.", "{n} {src}"),
)

FORMAT_KEYS = tuple("abcdxyz")
FORMAT_TEMPLATES = {
    "to_json": (
        ("Write {pairs} as JSON.", ""),
        ("Convert {pairs} to a JSON object.", ""),
        ("Turn these pairs into JSON.", "{pairs}"),
    ),
    "to_pairs": (
        ("Write {json} as key=value pairs.", ""),
        ("Convert the JSON {json} to key=value form.", ""),
        ("Rewrite this JSON as key=value pairs.", "{json}"),
    ),
    "csv_to_list": (
        ("Turn the CSV row {csv} into a list.", ""),
        ("Write the CSV row {csv} as a JSON list.", ""),
        ("Convert this CSV row to a list.", "{csv}"),
    ),
}


def _fill(rng: random.Random, templates, **values) -> tuple[str, str]:
    instruction, input_ = rng.choice(templates)
    return instruction.format(**values), input_.format(**values)


def make_arithmetic(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if rng.random() < 0.5:
        sym, word, answer = "+", "plus", a + b
    else:
        a, b = max(a, b), min(a, b)  # non-negative answers: one thing fewer for a tiny model to learn
        sym, word, answer = "-", "minus", a - b
    return (*_fill(rng, ARITHMETIC_TEMPLATES, a=a, b=b, sym=sym, word=word), str(answer))


def make_list_ops(rng: random.Random) -> tuple[str, str, str]:
    numbers = [rng.randint(0, 20) for _ in range(rng.randint(3, 5))]
    op = rng.choice(sorted(LIST_TEMPLATES))
    nums = ", ".join(map(str, numbers))
    return (*_fill(rng, LIST_TEMPLATES[op], nums=nums), str(LIST_ANSWERS[op](numbers)))


def make_string_edit(rng: random.Random) -> tuple[str, str, str]:
    op = rng.choice(sorted(STRING_TEMPLATES))
    word = rng.choice(WORDS)
    answers = {"upper": word.upper(), "lower": word, "repeat": f"{word} {word}", "first_letter": word[0]}
    shown = word.upper() if op == "lower" else word
    return (*_fill(rng, STRING_TEMPLATES[op], word=shown), answers[op])


def make_unit_conversion(rng: random.Random) -> tuple[str, str, str]:
    large, small, factor = rng.choice(UNITS)
    count = rng.randint(1, 20)
    if rng.random() < 0.5:
        n, src, dst, answer = count, large, small, count * factor
    else:
        n, src, dst, answer = count * factor, small, large, count
    return (*_fill(rng, UNIT_TEMPLATES, n=n, src=src, dst=dst), f"{answer} {dst}")


def make_format_conversion(rng: random.Random) -> tuple[str, str, str]:
    op = rng.choice(sorted(FORMAT_TEMPLATES))
    if op == "csv_to_list":
        numbers = [rng.randint(0, 20) for _ in range(rng.randint(2, 4))]
        return (*_fill(rng, FORMAT_TEMPLATES[op], csv=",".join(map(str, numbers))), json.dumps(numbers))
    keys = rng.sample(FORMAT_KEYS, rng.randint(2, 3))
    obj = {key: rng.randint(0, 9) for key in keys}
    pairs = ", ".join(f"{key}={value}" for key, value in obj.items())
    instruction, input_ = _fill(rng, FORMAT_TEMPLATES[op], pairs=pairs, json=json.dumps(obj))
    return instruction, input_, json.dumps(obj) if op == "to_json" else pairs


DOMAINS = {
    "arithmetic": make_arithmetic,
    "list_ops": make_list_ops,
    "string_edit": make_string_edit,
    "unit_conversion": make_unit_conversion,
    "format_conversion": make_format_conversion,
}


@dataclass(frozen=True)
class CorpusFiles:
    train_files: dict[str, Path]  # format name ("alpaca", "sharegpt") -> path
    eval_files: dict[str, Path]  # domain -> Alpaca-style path


def check_answer(prediction: str, reference: str) -> bool:
    """True when the two match exactly after stripping whitespace and one trailing period."""
    return _normalise_answer(prediction) == _normalise_answer(reference)


def _normalise_answer(text: str) -> str:
    text = text.strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def generate_corpus(
    out_dir: str | os.PathLike,
    in_domain: list[str],
    out_of_domain: list[str],
    train_per_domain: int,
    eval_per_domain: int,
    seed: int,
) -> CorpusFiles:
    """Write the corpus under `out_dir` (or reuse it if its manifest has the same parameters); return its files."""
    _check_domains(in_domain, out_of_domain)
    assert train_per_domain > 0 and eval_per_domain > 0, "per-domain counts must be positive"
    out_dir = Path(out_dir)
    files = CorpusFiles(
        train_files={name: out_dir / "train" / f"{name}.jsonl" for name in ("alpaca", "sharegpt")},
        eval_files={domain: out_dir / "eval" / f"{domain}.jsonl" for domain in [*in_domain, *out_of_domain]},
    )
    parameters = {
        "version": GENERATOR_VERSION,
        "in_domain": list(in_domain),
        "out_of_domain": list(out_of_domain),
        "train_per_domain": train_per_domain,
        "eval_per_domain": eval_per_domain,
        "seed": seed,
    }
    manifest_path = out_dir / "manifest.json"
    if _is_current(manifest_path, parameters, files):
        return files
    # Remove the old manifest first: if we crash below it must not vouch for half-rewritten files.
    manifest_path.unlink(missing_ok=True)

    alpaca, sharegpt, train_prompts = [], [], set()
    for domain in in_domain:
        rng = random.Random(f"{seed}:{domain}:train")
        for _ in range(train_per_domain):
            instruction, input_, output = DOMAINS[domain](rng)
            train_prompts.add((instruction, input_))
            # Alternate over all records so every domain lands in both formats.
            if (len(alpaca) + len(sharegpt)) % 2 == 0:
                alpaca.append(_alpaca(instruction, input_, output, domain))
            else:
                conversation_id = f"{domain}-{len(sharegpt)}"
                sharegpt.append(_sharegpt(conversation_id, instruction, input_, output, domain))
    # Shuffled so a reader that takes the first N records still sees every domain.
    random.Random(f"{seed}:shuffle").shuffle(alpaca)
    random.Random(f"{seed}:shuffle").shuffle(sharegpt)
    record_counts = {"train/alpaca.jsonl": len(alpaca), "train/sharegpt.jsonl": len(sharegpt)}
    _write_jsonl(files.train_files["alpaca"], alpaca)
    _write_jsonl(files.train_files["sharegpt"], sharegpt)

    for domain, path in files.eval_files.items():
        records = _sample_unseen(domain, eval_per_domain, seed, train_prompts)
        _write_jsonl(path, [_alpaca(*record, domain) for record in records])
        record_counts[f"eval/{domain}.jsonl"] = len(records)
    for stale in sorted((out_dir / "eval").glob("*.jsonl")):
        if stale not in files.eval_files.values():
            stale.unlink()

    write_json(manifest_path, {"parameters": parameters, "records": record_counts})
    return files


def _check_domains(in_domain: list[str], out_of_domain: list[str]) -> None:
    valid = ", ".join(DOMAINS)
    for field, names in (("corpus.in_domain", in_domain), ("corpus.out_of_domain", out_of_domain)):
        for name in names:
            if name not in DOMAINS:
                raise UserError(f"{field}: unknown domain {name!r}; valid domains: {valid}")
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise UserError(f"{field}: domain listed more than once: {', '.join(repeated)}")
    if not in_domain:
        raise UserError(f"corpus.in_domain: name at least one domain to train on; valid domains: {valid}")
    both = sorted(set(in_domain) & set(out_of_domain))
    if both:
        raise UserError(f"corpus.out_of_domain: {', '.join(both)} is also in corpus.in_domain; list it in one only")


def _is_current(manifest_path: Path, parameters: dict, files: CorpusFiles) -> bool:
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    paths = [*files.train_files.values(), *files.eval_files.values()]
    return manifest.get("parameters") == parameters and all(path.is_file() for path in paths)


def _sample_unseen(domain: str, count: int, seed: int, train_prompts: set) -> list[tuple[str, str, str]]:
    """`count` distinct records whose prompts are not in training; bounded tries so a full space fails loudly."""
    rng = random.Random(f"{seed}:{domain}:eval")
    records, taken = [], set(train_prompts)
    for _ in range(1000 + 100 * count):
        if len(records) == count:
            return records
        instruction, input_, output = DOMAINS[domain](rng)
        if (instruction, input_) not in taken:
            taken.add((instruction, input_))
            records.append((instruction, input_, output))
    if len(records) == count:
        return records
    raise UserError(
        f"corpus.eval_per_domain: found only {len(records)} of {count} {domain!r} eval prompts unseen in "
        f"training; lower corpus.eval_per_domain or corpus.train_per_domain"
    )


def _alpaca(instruction: str, input_: str, output: str, domain: str) -> dict:
    return {"instruction": instruction, "input": input_, "output": output, "domain": domain}


def _sharegpt(conversation_id: str, instruction: str, input_: str, output: str, domain: str) -> dict:
    prompt = f"{instruction}\n\n{input_}" if input_ else instruction
    turns = [{"from": "human", "value": prompt}, {"from": "gpt", "value": output}]
    return {"id": conversation_id, "conversations": turns, "domain": domain}


def _write_jsonl(path: Path, records: list[dict]) -> None:
    write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
