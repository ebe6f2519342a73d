"""`prepare` end to end on real Ray: every reject reason, the accounting, dedup across files, scoring, mixing,
label masks, outcome markers, the manifest, the report, streaming, and atomic output.

One prepare run (module scope) over a corpus this file writes, plus the real files in ../shared/data when
they are there, is shared by most tests; each prepare costs tens of seconds on a laptop.
"""

import contextlib
import hashlib
import io
import json
import random
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import ray
import ray.data

from instune.config import validate_config
from instune.data.manifest import load_manifest
from instune.data.prepare import prepare
from instune.data.splits import stream_train_data
from instune.data.tokenize import IGNORE_INDEX
from instune.errors import UserError

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
HAVE_SHARED = all((SHARED / f).is_file() for f in ("sharegpt_dummy_conversation.json", "alpaca_seed_tasks.jsonl",
                                                   "mt_bench_questions.jsonl"))
needs_shared = pytest.mark.skipif(not HAVE_SHARED, reason=f"real data files missing from {SHARED}")
WORDS = ("time person year way day thing world life hand part child eye woman place work week case point company "
         "number group problem fact have make know take see come think look want give use find tell ask seem feel "
         "try leave call good new first last long great little own other old right big high different small large "
         "next early young important few public bad same able water river mountain garden kitchen window music "
         "letter teacher student market village city bridge forest island morning evening summer winter library "
         "doctor engine paper story question answer picture family friend animal flower table chair road train "
         "station ocean valley castle farmer painter bakery school lesson history science planet").split()
SEQ_LEN = 256
MIX_SIZE = 300


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def chat(user: str, *answers_and_users: str) -> dict:
    turns = [user, *answers_and_users]
    return {"messages": [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(turns)]}


def write_corpus(root: Path) -> dict:
    """Write the test corpus; return what the tests expect of it."""
    rng = random.Random(0)
    chat_dir = root / "chat"
    chat_dir.mkdir(parents=True)
    a_lines: list[bytes] = []
    expected = {"positions": {}}

    def add(record, key: str | None = None):
        a_lines.append(record if isinstance(record, bytes) else json.dumps(record).encode())
        if key:
            expected["positions"][key] = f"line {len(a_lines)}"

    first = chat("Tell me about the first garden.", "The first garden had old trees and a small river.")
    add(first, "duplicated")
    long_answer = words(rng, 120)
    add(chat("Describe the long walk.", long_answer), "near_duplicated")
    add(b'{"messages": [{"role": "user", "content": "hi"}', "malformed")
    add(b'{"messages": "caf\xe9 \xff"}', "invalid_utf8")
    add(chat("Say it.", "x " * 2500), "oversize")
    add([1, 2], "array_line")
    add({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "ok"}]}, "wrong_type")
    add({"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "ok"}]}, "unknown_role")
    add({"messages": []}, "empty")
    add({"messages": [{"role": "user", "content": "Hello there, how are you today?"}]}, "no_assistant")
    add(chat("Can you help?", "As an AI language model, I cannot help with that request today."), "low_quality")
    add(chat("Write a lot.", words(rng, 300)[:1800]), "too_long_turn")
    add(chat("Décris la ville.", "Le chat est assis sur le tapis et regarde la pluie tomber doucement sur la "
             "ville pendant que les enfants jouent dans le jardin."), "french")
    labelled = Counter()
    for i in range(50):
        record = chat(f"Question {i}: {words(rng, rng.randint(6, 14))}?", words(rng, rng.randint(8, 30)))
        if i % 10 in (0, 5):
            record["outcome"] = "success" if i % 10 == 0 else "failure"
            labelled[record["outcome"]] += 1
        add(record)
    for i in range(8):
        add(chat(f"Talk {i}: {words(rng, 8)}", words(rng, 10), f"And then {words(rng, 6)}?", words(rng, 12)))
    for i in range(5):  # over max_length tokens: dropped at tokenization (truncation: drop)
        add(chat(f"Long {i}: {words(rng, 110)}", words(rng, 5)))
    (chat_dir / "a.jsonl").write_bytes(b"\n".join(a_lines) + b"\n")

    b_records = [chat(f"Other {i}: {words(rng, 10)}", words(rng, 15)) for i in range(10)]
    duplicate = json.loads(json.dumps(first))
    duplicate["messages"][1]["content"] = "  THE FIRST garden had old trees\tand a small river. "
    near = chat("Describe the long walk.", " ".join(w if k != 60 else "zebra" for k, w in
                                                    enumerate(long_answer.split())))
    b_records += [duplicate, near]
    (chat_dir / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in b_records))
    expected["b_positions"] = {"duplicate": f"line {len(b_records) - 1}", "near": f"line {len(b_records)}"}

    arr = [chat(f"Small {i}: {words(rng, 8)}", words(rng, 12)) for i in range(3)]
    text = json.dumps(arr + [chat("cut", "off")])
    (root / "arr.json").write_text(text[: text.rindex('"off"')])  # the file ends inside the fourth record

    expected["read"] = {"chat": len(a_lines) + len(b_records), "arr": 4}
    expected["labelled"] = dict(labelled)
    return expected


def make_config(root: Path, sources: list[dict], **data) -> object:
    return validate_config({"name": "t", "output_dir": str(root / "out"), "model": {"max_length": SEQ_LEN},
                            "data": {"sources": sources, **data}})


def test_missing_source_path_fails_before_ray_starts(tmp_path, model_dir, monkeypatch):
    import instune.data.prepare as prepare_module

    def ray_work(*args, **kwargs):
        raise AssertionError("Ray work started before the sources were checked")

    # The first two things prepare hands to Ray (the data tests share one running cluster, so whether Ray
    # is up says nothing here).
    monkeypatch.setattr(prepare_module, "start_loading_tokenizer_parts", ray_work)
    monkeypatch.setattr(prepare_module, "filter_and_split", ray_work)
    config = make_config(tmp_path, [{"name": "gone", "path": str(tmp_path / "nowhere.jsonl")}])
    with pytest.raises(UserError, match=r"source 'gone': path .*nowhere.jsonl does not exist"):
        prepare(config, model_dir, tmp_path / "data")
    assert not (tmp_path / "data").exists() and not list(tmp_path.glob(".data*"))


# ---------------------------------------------------------------- one prepare run, many checks


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, model_dir, local_ray):
    root = tmp_path_factory.mktemp("prepare")
    expected = write_corpus(root / "corpus")
    sources = [{"name": "chat", "path": str(root / "corpus" / "chat"), "format": "openai"},
               {"name": "arr", "path": str(root / "corpus" / "arr.json"), "format": "openai"}]
    if HAVE_SHARED:
        sources += [{"name": "sharegpt", "path": str(SHARED / "sharegpt_dummy_conversation.json"),
                     "format": "sharegpt"},
                    # Seed tasks are long for the tiny tokenizer: filtered and scored, but not mixed in.
                    {"name": "seed", "path": str(SHARED / "alpaca_seed_tasks.jsonl"), "weight": 0},
                    {"name": "mtbench", "path": str(SHARED / "mt_bench_questions.jsonl")}]
    config = make_config(
        root, sources, max_record_bytes=4000, truncation="drop", mix_size=MIX_SIZE, validation_fraction=0.1,
        filters={"length": {"max_turn_chars": 1500}, "language": {}, "quality": {}},
        dedup={"exact": True, "near": {}},
        score={"top_fraction": 0.9, "max_score": None},
        outcome_markers={"success": "GOOD RUN.", "failure": "BAD RUN."})
    data_dir = root / "out" / "data"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        manifest = prepare(config, model_dir, data_dir, model_path=model_dir)
    return {"manifest": manifest, "data_dir": data_dir, "expected": expected, "config": config,
            "model_dir": model_dir, "printed": printed.getvalue()}


def read_table(directory: Path, columns=None) -> pa.Table:
    return pads.dataset(str(directory), format="parquet").to_table(columns=columns)


def quarantine_rows(prepared, source: str) -> list[dict]:
    rows = read_table(prepared["data_dir"] / "quarantine").to_pylist()
    return [r for r in rows if r["source"] == source]


@pytest.mark.slow
def test_every_reject_reason_is_recorded_with_its_record(prepared):
    positions = prepared["expected"]["positions"]
    by_record = {(Path(r["file"]).name, r["record"]): r for r in quarantine_rows(prepared, "chat")}

    def reject(key: str, file: str = "a.jsonl") -> dict:
        position = positions[key] if file == "a.jsonl" else prepared["expected"]["b_positions"][key]
        assert (file, position) in by_record, f"{key} ({file} {position}) was not rejected"
        return by_record[(file, position)]

    expected = {
        "malformed": ("read", "malformed JSON"),
        "invalid_utf8": ("read", "invalid UTF-8 at byte"),
        "oversize": ("read", "over max_record_bytes (4000)"),
        "array_line": ("read", "expected a JSON object, got an array"),
        "wrong_type": ("normalise", "messages[0].content is a number"),
        "unknown_role": ("normalise", "unknown role 'robot' in messages[0]"),
        "empty": ("normalise", "empty conversation"),
        "no_assistant": ("normalise", "no assistant message"),
        "too_long_turn": ("filter:length", "1500"),
        "low_quality": ("filter:quality", "boilerplate phrase 'as an ai language model, i cannot'"),
        "french": ("filter:language", "language 'fr'"),
    }
    for key, (stage, fragment) in expected.items():
        row = reject(key)
        assert row["stage"] == stage and fragment in row["reason"], (key, row)
        assert row["example"], f"{key} has no example for the report"
    duplicate = reject("duplicate", "b.jsonl")
    assert duplicate["stage"] == "dedup:exact"
    assert duplicate["reason"] == f"exact duplicate of chat:a.jsonl:{positions['duplicated']}"
    near = reject("near", "b.jsonl")
    assert near["stage"] == "dedup:near"
    assert near["reason"].startswith(f"near-duplicate of chat:a.jsonl:{positions['near_duplicated']} (jaccard")
    [truncated] = quarantine_rows(prepared, "arr")
    assert truncated["stage"] == "read" and truncated["reason"] == "truncated JSON array (file ends inside a record)"
    # Records too long to train on are accounted for at tokenization, with their reason.
    dropped = prepared["manifest"]["splits"]["train"]["dropped"]["chat"]
    assert [d["reason"] for d in dropped] == ["N tokens is over max_length N"]
    # ... and the per-source table counts them as rejected, not kept (each record once, in either split).
    from instune.data.accounting import source_table

    chat = prepared["manifest"]["sources"]["chat"]
    drops = [prepared["data_dir"] / "dropped" / split for split in ("train", "validation")]
    distinct = {r["id"] for d in drops if d.is_dir() for r in read_table(d).to_pylist() if r["source"] == "chat"}
    assert chat["dropped_at_tokenization"] == len(distinct) >= dropped[0]["count"] > 0
    columns, rows = source_table(prepared["manifest"]["sources"])
    row = dict(zip(columns, next(r for r in rows if r[0] == "chat")))
    assert (row["kept"], row["rejected"]) == (chat["kept"] - len(distinct), chat["rejected"] + len(distinct))
    assert row["kept"] + row["rejected"] == row["read"]


@pytest.mark.slow
def test_scoring_keeps_the_top_fraction_of_each_source(prepared):
    for source, counts in prepared["manifest"]["sources"].items():
        rows = {r["stage"]: r for r in counts["stages"]}
        rejected = [r for r in quarantine_rows(prepared, source) if r["stage"] == "score"]
        assert len(rejected) == rows["score"]["rejected"]
        filtered = read_table(prepared["data_dir"] / "filtered", ["metadata", "source"]).to_pylist()
        metadata = [json.loads(r["metadata"]) for r in filtered if r["source"] == source]
        scored = [m["ifd"] for m in metadata if "ifd" in m]
        # ceil(0.9 * n) of the n scored records are kept; the unscored (too long to score) are kept too.
        n = len(scored) + len(rejected)
        assert len(scored) == -(-9 * n // 10), source
        rejected_scores = [float(re.match(r"ifd (\S+) is not in the highest 90%", r["reason"]).group(1))
                           for r in rejected]
        if rejected_scores:
            assert min(scored) >= max(rejected_scores) - 1e-4


@pytest.mark.slow
def test_every_record_is_accounted_for(prepared):
    manifest, data_dir = prepared["manifest"], prepared["data_dir"]
    filtered = Counter(read_table(data_dir / "filtered", ["source"])["source"].to_pylist())
    quarantine = Counter((r["source"], r["stage"]) for r in read_table(data_dir / "quarantine").to_pylist())
    for name, counts in manifest["sources"].items():
        assert counts["read"] == counts["kept"] + counts["rejected"], name
        assert counts["kept"] == filtered.get(name, 0)
        remaining = counts["read"]
        for row in counts["stages"]:
            assert row["in"] == remaining and row["out"] == row["in"] - row["rejected"]
            assert row["rejected"] == quarantine.get((name, row["stage"]), 0), (name, row)
            remaining = row["out"]
        assert remaining == counts["kept"]
    for name, read in prepared["expected"]["read"].items():
        assert manifest["sources"][name]["read"] == read
    for split, stats in manifest["splits"].items():
        for name, drawn in stats["drawn"].items():
            dropped = sum(d["count"] for d in stats["dropped"].get(name, []))
            assert drawn == stats["examples_by_source"].get(name, 0) + dropped, (split, name)


@needs_shared
@pytest.mark.slow
def test_real_files_are_read_normalised_and_deduplicated(prepared):
    sources = prepared["manifest"]["sources"]
    assert sources["sharegpt"]["read"] == 500 and sources["mtbench"]["read"] == 80
    assert sources["mtbench"]["kept"] == 0
    assert {r["reason"] for r in sources["mtbench"]["rejects"]} == \
        {"no assistant message: 'turns' holds N user prompt(s) and no answers"}
    # Each seed task (one instance each in this file) becomes one Alpaca record per instance.
    assert sources["seed"]["read"] == 175 and sources["seed"]["kept"] > 150
    seed_ids = [r["id"] for r in read_table(prepared["data_dir"] / "filtered", ["id", "source"]).to_pylist()
                if r["source"] == "seed"]
    assert all(i.endswith(" instance 0") for i in seed_ids)
    # The dummy ShareGPT file repeats its identity answers in many phrasings: near-duplicates across blocks.
    near = {r["stage"]: r for r in sources["sharegpt"]["stages"]}["dedup:near"]
    assert near["rejected"] > 50


@pytest.mark.slow
def test_mixture_is_realised_within_tolerance_and_upsamples(prepared):
    manifest = prepared["manifest"]
    mixture, train = manifest["mixture"], manifest["splits"]["train"]
    mixed = [s for s, w in mixture["weights"].items() if w > 0 and manifest["sources"][s]["kept"]]
    assert abs(sum(train["drawn"].values()) - MIX_SIZE) <= 15
    for source in mixed:
        assert mixture["requested"][source] == pytest.approx(1 / len(mixed))
        assert abs(train["drawn"][source] - MIX_SIZE / len(mixed)) <= 12, source
        assert abs(mixture["realised"][source]["fraction"] - mixture["requested"][source]) <= 0.05, source
        assert mixture["realised"][source]["examples"] == train["examples_by_source"][source]
    # "arr" has three records: the mixture repeats them about 100 / (records outside validation) times.
    assert mixture["copies_per_record"]["arr"] >= 30 and train["drawn"]["arr"] > 3 * 30
    assert "seed" not in train["drawn"] or train["drawn"]["seed"] == 0


@pytest.mark.slow
def test_packed_rows_label_exactly_the_assistant_turns(prepared):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prepared["model_dir"])
    rows = read_table(prepared["data_dir"] / "train").to_pylist()
    assistant = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)\n", re.S)
    examples, multi_turn = 0, 0
    for row in rows:
        assert len(row["input_ids"]) == SEQ_LEN and len(row["sources"]) == row["num_examples"]
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0][: row["num_examples"]] + [row["num_tokens"]]
        for a, b in zip(starts, starts[1:]):
            ids, labels = row["input_ids"][a:b], row["labels"][a:b]
            text = tokenizer.decode(ids)
            answers = assistant.findall(text)
            assert answers, text
            labelled = tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])
            assert labelled == "".join(answers)
            assert all(label in (IGNORE_INDEX, t) for t, label in zip(ids, labels))
            examples += 1
            multi_turn += len(answers) > 1
        assert set(row["labels"][row["num_tokens"]:]) <= {IGNORE_INDEX}
    assert examples == prepared["manifest"]["splits"]["train"]["examples"] and multi_turn > 0


@pytest.mark.slow
def test_outcome_markers_are_added_at_tokenization_only(prepared):
    from transformers import AutoTokenizer

    manifest, data_dir = prepared["manifest"], prepared["data_dir"]
    filtered = read_table(data_dir / "filtered", ["source", "metadata", "messages"]).to_pylist()
    labelled = Counter(json.loads(r["metadata"]).get("outcome") for r in filtered if r["source"] == "chat")
    assert manifest["outcomes"]["chat"]["success"] == labelled["success"] > 0
    assert manifest["outcomes"]["chat"]["failure"] == labelled["failure"] > 0
    assert not any("RUN." in m["content"] for r in filtered for m in r["messages"])  # phase 1 is untouched
    tokenizer = AutoTokenizer.from_pretrained(prepared["model_dir"])
    texts = [tokenizer.decode(r["input_ids"]) for r in read_table(data_dir / "train", ["input_ids"]).to_pylist()]
    marked = sum(t.count("<|im_start|>system\nGOOD RUN.<|im_end|>") for t in texts)
    failed = sum(t.count("<|im_start|>system\nBAD RUN.<|im_end|>") for t in texts)
    assert marked > 0 and failed > 0


@pytest.mark.slow
def test_manifest_report_and_progress(prepared):
    manifest, data_dir = prepared["manifest"], prepared["data_dir"]
    assert load_manifest(data_dir) == json.loads(json.dumps(manifest))
    for relative, digest in manifest["files"].items():
        assert hashlib.sha256((data_dir / relative).read_bytes()).hexdigest() == digest
    assert {p.name for p in data_dir.parent.iterdir()} == {"data"}  # no partial or old directories
    report = (data_dir / manifest["report"]).read_text()
    for section in ("Records per source", "Rejects by reason", "Duplicates found", "Language mix",
                    "Reference-model scores", "Lengths", "Mixture", "Dropped at tokenization", "Outcome labels"):
        assert f"## {section}" in report
    for image in re.findall(r"\]\(([^)]+\.png)\)", report):
        assert (data_dir / "report" / image).stat().st_size > 1000
    printed = prepared["printed"]
    read = sum(c["read"] for c in manifest["sources"].values())
    kept = sum(c["kept"] for c in manifest["sources"].values())
    assert re.search(rf"\[prepare\] phase 1 .*: {read} records from \d+ files -> kept {kept}, rejected {read - kept}",
                     printed)
    examples = manifest["splits"]["train"]["examples"]
    assert re.search(rf"\[prepare\] phase 2 .*: train \d+ drawn -> {examples} examples in", printed)


@pytest.mark.slow
def test_streamed_training_data_matches_the_written_split(prepared):
    train, validation = stream_train_data(prepared["config"], prepared["model_dir"], prepared["data_dir"])
    counts = Counter()
    examples = 0
    for batch in train.iter_batches(batch_format="pyarrow", batch_size=None):
        for sources in batch["sources"].to_pylist():
            counts.update(sources)
        examples += sum(batch["num_examples"].to_pylist())
    written = prepared["manifest"]["splits"]["train"]
    assert dict(counts) == written["examples_by_source"] and examples == written["examples"]
    assert validation is not None and validation.sum("num_examples") == prepared["manifest"]["splits"]["validation"][
        "examples"]


# ---------------------------------------------------------------- atomic output


@pytest.mark.slow
def test_output_is_atomic_and_replaced_whole(tmp_path, model_dir, local_ray):
    rng = random.Random(1)
    (tmp_path / "one.jsonl").write_text("".join(json.dumps(chat(words(rng, 6), words(rng, 8))) + "\n"
                                                for _ in range(20)))
    (tmp_path / "two.jsonl").write_text("".join(json.dumps(chat(words(rng, 6), words(rng, 8))) + "\n"
                                                for _ in range(15)))
    (tmp_path / "bad.jsonl").write_text('{"messages": []}\n' * 5)
    data_dir = tmp_path / "out" / "data"
    quiet = {"dedup": {"exact": True}}

    with contextlib.redirect_stdout(io.StringIO()):
        prepare(make_config(tmp_path, [{"name": "one", "path": str(tmp_path / "one.jsonl")}], **quiet), model_dir,
                data_dir)
        first_files = {p.name for p in (data_dir / "train").iterdir()}
        second = prepare(make_config(tmp_path, [{"name": "one", "path": str(tmp_path / "one.jsonl")},
                                                {"name": "two", "path": str(tmp_path / "two.jsonl")}], **quiet),
                         model_dir, data_dir)
    assert sorted(load_manifest(data_dir)["sources"]) == ["one", "two"]
    assert not first_files & {p.name for p in (data_dir / "train").iterdir()}  # nothing of the first run is left
    assert {str(p.relative_to(data_dir)) for p in data_dir.rglob("*.parquet")} == set(second["files"])
    before = (data_dir / "manifest.json").read_bytes()

    failing = make_config(tmp_path, [{"name": "bad", "path": str(tmp_path / "bad.jsonl")}], **quiet)
    with contextlib.redirect_stdout(io.StringIO()):
        with pytest.raises(UserError, match=r"no records left .* normalise: empty conversation"):
            prepare(failing, model_dir, data_dir)
        # A failed prepare leaves the previous complete output as it was...
        assert (data_dir / "manifest.json").read_bytes() == before
        # ...and, where there was none, no data directory at all.
        with pytest.raises(UserError):
            prepare(failing, model_dir, tmp_path / "fresh" / "data")
    assert not (tmp_path / "fresh" / "data").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["data"]
    assert list((tmp_path / "fresh").iterdir()) == []
