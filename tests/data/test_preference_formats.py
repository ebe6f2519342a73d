"""Preference pairs: the three formats, auto-detection and field maps, a reason for every reject, the refusal
of pairs given to an SFT run (and the reverse), and tokenization with response-only labels — on Anthropic's
real HH-RLHF pairs where they matter."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from instune.base_model import tokenizer_training_texts
from instune.data.formats import RecordError
from instune.data.preference_formats import (check_source_kind, first_record, normalise_pair, parse_transcript,
                                             read_pairs, to_pairs, validate_pair_field_map)
from instune.data.preference_tokenize import fit_pair, tokenize_pairs
from instune.data.read import RawItem
from instune.data.tokenize import IGNORE_INDEX
from instune.default.tokenizer import train_tokenizer
from instune.errors import UserError

HH_RLHF = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "hh_rlhf_harmless_test.jsonl.gz"


@pytest.fixture(scope="module")
def hh_rlhf() -> str:
    if not HH_RLHF.is_file():
        pytest.skip(f"real test data missing: {HH_RLHF} (see /work/shared/data/README.md)")
    return str(HH_RLHF)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(tokenizer_training_texts(per_domain=30), vocab_size=400)


USER = {"role": "user", "content": "What is 2 + 2?"}


def test_the_three_formats_give_the_same_pair():
    expected = {"prompt": [USER], "chosen": "4", "rejected": "5"}
    strings = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}
    # UltraFeedback-binarized: the prompt string repeated inside both conversations.
    messages = {"prompt": "What is 2 + 2?", "chosen": [USER, {"role": "assistant", "content": "4"}],
                "rejected": [{"from": "human", "value": "What is 2 + 2?"}, {"from": "gpt", "value": "5"}]}
    transcript = {"chosen": "\n\nHuman: What is 2 + 2?\n\nAssistant: 4",
                  "rejected": "\n\nHuman: What is 2 + 2?\n\nAssistant: 5"}
    for record, fmt in ((strings, "pairs"), (messages, "pair_messages"), (transcript, "hh_rlhf")):
        assert normalise_pair(record, fmt) == expected
        assert normalise_pair(record, "auto") == expected, fmt
    mapped = {"question": "What is 2 + 2?", "good": "4", "bad": "5"}
    assert normalise_pair(mapped, "mapped", {"prompt": "question", "chosen": "good", "rejected": "bad"}) == expected
    # Answers alone in message lists take the prompt field; a system field goes first.
    answers_only = {"prompt": "What is 2 + 2?", "system": "Be brief.", "chosen": [{"role": "assistant", "content": "4"}],
                    "rejected": [{"role": "assistant", "content": "5"}]}
    assert normalise_pair(answers_only, "auto")["prompt"] == [{"role": "system", "content": "Be brief."}, USER]


@pytest.mark.parametrize("record, reason", [
    ({"prompt": "q", "chosen": "same", "rejected": "same "}, "chosen is identical to rejected"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "empty chosen response"),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, "empty rejected response"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "no shared prompt"),
    ({"chosen": [USER, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
     "no shared prompt: chosen and rejected differ at message 0"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: other\n\nAssistant: b"}, "no shared prompt"),
    ({"chosen": "Robot: q\n\nAssistant: a", "rejected": "Robot: q\n\nAssistant: b"}, "unknown roles"),
    ({"chosen": [{"role": "wizard", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "wizard", "content": "q"}, {"role": "assistant", "content": "b"}]}, "unknown role 'wizard'"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a\n\nHuman: more?", "rejected": "\n\nHuman: q\n\nAssistant: b"},
     "ends with a Human turn"),
    ({"instruction": "q", "output": "a"}, "not a preference pair: looks like alpaca"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "cannot detect a pair format"),
])
def test_every_bad_pair_is_rejected_with_its_reason(record, reason):
    with pytest.raises(RecordError, match=reason):
        normalise_pair(record, "auto")


def test_hh_rlhf_file_every_pair_kept_or_rejected_with_a_reason(hh_rlhf):
    outcomes = list(read_pairs(hh_rlhf, "hh", "harmless", "auto", None, 1_000_000))
    counts = Counter(outcome for outcome, _ in outcomes)
    assert counts == {"kept": 2303, "rejected": 9}  # 2,312 real pairs read
    reasons = Counter(row["reason"].split(":")[0] for outcome, row in outcomes if outcome == "rejected")
    assert reasons == {"empty chosen response": 4, "no shared prompt": 5}
    kept = [row for outcome, row in outcomes if outcome == "kept"]
    first = json.loads(json.dumps(kept[0]))  # plain JSON: what a Ray Data row holds
    assert first["prompt"][0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    assert [m["role"] for m in first["prompt"]] == ["user", "assistant", "user", "assistant", "user"]
    assert first["chosen"].startswith("No, sorry!") and first["rejected"].startswith("There are lots of funny")
    assert first["id"] == "hh:hh_rlhf_harmless_test.jsonl.gz:line 1" and first["domain"] == "harmless"
    # The prompts are the transcripts' shared prefix: each side's transcript is prompt + its last turn.
    raw = json.loads(next(iter(gzip.open(hh_rlhf, "rt"))))
    assert parse_transcript(raw["chosen"], "chosen") == first["prompt"] + [
        {"role": "assistant", "content": first["chosen"]}]


def test_read_errors_and_pairs_are_both_accounted():
    items = [RawItem("line 1", None, "invalid JSON", "{"),
             RawItem("line 2", {"prompt": "q", "chosen": "a", "rejected": "b", "domain": "math"}, None, "")]
    outcomes = list(to_pairs(items, "s", "general", "auto", None, "f.jsonl"))
    assert [(o, r.get("stage"), r.get("domain")) for o, r in outcomes] == [("rejected", "read", None),
                                                                          ("kept", None, "math")]


def test_preference_file_given_to_sft_and_the_reverse_are_refused_in_one_line(hh_rlhf, tmp_path):
    record = first_record(hh_rlhf, 1_000_000)
    with pytest.raises(UserError) as error:
        check_source_kind("hh", hh_rlhf, "auto", record, "sft")
    message = str(error.value)
    assert "\n" not in message and message.startswith("source 'hh': ") and "looks like preference pairs" in message
    assert "train.objective is sft" in message
    check_source_kind("hh", hh_rlhf, "auto", record, "dpo")  # fits
    alpaca = tmp_path / "a.jsonl"
    alpaca.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    with pytest.raises(UserError, match=r"source 'a': .*a.jsonl looks like alpaca conversations .* train.objective "
                                        r"is dpo; a preference objective needs chosen/rejected pairs"):
        check_source_kind("a", str(alpaca), "auto", first_record(str(alpaca), 1000), "dpo")
    with pytest.raises(UserError, match="format hh_rlhf holds preference pairs, but train.objective is sft"):
        check_source_kind("hh", hh_rlhf, "hh_rlhf", None, "sft")
    with pytest.raises(UserError, match="format alpaca holds conversations, but train.objective is orpo"):
        check_source_kind("a", str(alpaca), "alpaca", None, "orpo")


def test_pair_field_maps_are_checked_before_reading():
    validate_pair_field_map("s", "mapped", {"prompt": "q", "chosen": "a", "rejected": "b"})
    with pytest.raises(UserError, match="needs 'chosen' and 'rejected'"):
        validate_pair_field_map("s", "mapped", {"prompt": "q", "chosen": "a"})
    with pytest.raises(UserError, match=r"unknown key\(s\) \['output'\]"):
        validate_pair_field_map("s", "mapped", {"output": "q", "chosen": "a", "rejected": "b"})


def response_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])


def test_tokenized_sides_label_only_their_response_and_share_the_prompt(tokenizer):
    pair = {"prompt": [USER], "chosen": "4", "rejected": "It is 5."}
    [t] = tokenize_pairs([pair], tokenizer, 64, "drop")
    assert response_text(tokenizer, t.chosen_input_ids, t.chosen_labels) == "4<|im_end|>"
    assert response_text(tokenizer, t.rejected_input_ids, t.rejected_labels) == "It is 5.<|im_end|>"
    prompt = tokenizer.apply_chat_template([USER], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(t.chosen_input_ids) == prompt + "4<|im_end|>\n"
    first = int(np.flatnonzero(t.chosen_labels != IGNORE_INDEX)[0])
    assert t.chosen_input_ids[:first].tolist() == t.rejected_input_ids[:first].tolist()
    assert (t.prompt_tokens, t.prompt_cut, t.response_cut) == (first, 0, False)


def test_long_pairs_shorten_the_prompt_from_the_left_and_never_empty_a_response(tokenizer):
    long_prompt = {"prompt": [{"role": "user", "content": "one two three four " * 20}], "chosen": "4",
                   "rejected": "five"}
    [full] = tokenize_pairs([long_prompt], tokenizer, 1024, "prompt_left")
    [t] = tokenize_pairs([long_prompt], tokenizer, 24, "prompt_left")
    # The longer side is exactly 24 tokens: the prompt lost just what did not fit, from its left.
    assert max(len(t.chosen_input_ids), len(t.rejected_input_ids)) == 24 and not t.response_cut
    assert t.prompt_cut == max(len(full.chosen_input_ids), len(full.rejected_input_ids)) - 24 > 0
    assert t.chosen_input_ids.tolist() == full.chosen_input_ids[t.prompt_cut:].tolist()
    assert response_text(tokenizer, t.chosen_input_ids, t.chosen_labels) == "4<|im_end|>"
    assert response_text(tokenizer, t.rejected_input_ids, t.rejected_labels) == "five<|im_end|>"
    # Both prompts lost the same tokens from the left, so they end the same.
    assert tokenizer.decode(t.chosen_input_ids).endswith("<|im_start|>assistant\n4<|im_end|>\n")
    # drop keeps no pair over max_length, however short its responses.
    [too_long] = tokenize_pairs([long_prompt], tokenizer, 24, "drop")
    assert isinstance(too_long, Exception) and "is over max_length 24" in str(too_long)
    long_answer = {"prompt": [USER], "chosen": "4", "rejected": "no " * 60}
    # prompt_left never cuts a response: a response that cannot fit whole drops the pair, with the reason.
    [dropped] = tokenize_pairs([long_answer], tokenizer, 24, "prompt_left")
    assert isinstance(dropped, Exception)
    assert "the rejected response has" in str(dropped) and "over max_length 24" in str(dropped)
    [cut] = tokenize_pairs([long_answer], tokenizer, 24, "truncate")
    assert cut.response_cut and len(cut.rejected_input_ids) == 24
    # One prompt token is left, so 23 response tokens are: never an empty response.
    assert int((cut.rejected_labels != IGNORE_INDEX).sum()) == 23


def test_fit_pair_leaves_a_fitting_pair_alone():
    ids = np.arange(6)
    labels = np.array([IGNORE_INDEX] * 3 + [3, 4, 5])
    fitted = fit_pair({"chosen": (ids, labels), "rejected": (ids[:5], labels[:5])}, 8, "drop")
    assert fitted.chosen_input_ids.tolist() == [0, 1, 2, 3, 4, 5] and fitted.prompt_cut == 0


def test_hh_rlhf_pairs_tokenize_with_non_empty_responses(hh_rlhf, tokenizer):
    kept = [row for outcome, row in read_pairs(hh_rlhf, "hh", "h", "auto", None, 1_000_000) if outcome == "kept"]
    results = tokenize_pairs(kept[:200], tokenizer, 256, "prompt_left")
    tokenized = [r for r in results if not isinstance(r, Exception)]
    assert len(tokenized) + sum(isinstance(r, Exception) for r in results) == 200
    assert len(tokenized) > 50  # most of the first 200 fit in 256 tokens once prompts are shortened
    for t in tokenized:
        assert len(t.chosen_input_ids) <= 256 and (t.chosen_labels != IGNORE_INDEX).any()
        assert len(t.rejected_input_ids) <= 256 and (t.rejected_labels != IGNORE_INDEX).any()
    assert sum(t.prompt_cut > 0 for t in tokenized) > 0


def test_sources_of_the_wrong_kind_are_refused_for_the_whole_config(hh_rlhf, tmp_path):
    from instune.config import SourceConfig
    from instune.data.preference_formats import check_sources_kind

    pairs = [SourceConfig(name="hh", path=hh_rlhf)]
    check_sources_kind(pairs, "dpo", 1_000_000)
    with pytest.raises(UserError, match="source 'hh': .* looks like preference pairs .* train.objective is sft"):
        check_sources_kind(pairs, "sft", 1_000_000)
    mapped = [SourceConfig(name="m", path=hh_rlhf, format="mapped", field_map={"chosen": "good"})]
    with pytest.raises(UserError, match="source 'm': field_map: needs 'chosen' and 'rejected'"):
        check_sources_kind(mapped, "simpo", 1_000_000)
