"""Preference pairs: one raw record -> a canonical pair (shared prompt, chosen response, rejected response).

Formats (a source's `format` under a preference train.objective):
    pairs          prompt, chosen, rejected strings (the prompt may also be a message list)[, system]
    pair_messages  chosen and rejected as conversations (OpenAI or ShareGPT turns) that share every message but
                   the last assistant one, as in UltraFeedback-binarized; a `prompt` is used when both sides
                   hold only their answer
    hh_rlhf        chosen and rejected as whole transcripts ("\\n\\nHuman: ... \\n\\nAssistant: ...") sharing a
                   prefix and differing in the last assistant turn (Anthropic HH-RLHF)
    mapped         field_map from prompt, chosen, rejected, system to the record's keys; then detected
    auto           detect_pair_format() from the keys

A canonical pair (one row): id, source, domain, prompt (messages), chosen (str), rejected (str), metadata
(JSON text). Every record read is kept or rejected with a one-line reason (RecordError): an empty side,
chosen identical to rejected, no shared prompt, unknown roles.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Iterator

from instune.data.formats import (FORMATS, RecordError, _field, _openai_messages, _sharegpt_turns, detect_format,
                                  mapped_field_map_keys, record_metadata)
from instune.data.read import RawItem, iter_raw_records, json_type_name
from instune.data.schema import EXAMPLE_CHARS, make_reject
from instune.errors import UserError

PAIR_FORMATS = ("pairs", "pair_messages", "hh_rlhf")
PAIR_MAPPED_KEYS = ("prompt", "chosen", "rejected", "system")
PAIR_COLUMNS = ("id", "source", "domain", "prompt", "chosen", "rejected", "metadata")
# HH-RLHF's speaker markers; a transcript is a sequence of "\n\nHuman: ..." and "\n\nAssistant: ..." turns.
HH_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def is_preference_format(fmt: str) -> bool:
    return fmt in PAIR_FORMATS


# ---------------------------------------------------------------- detection


def detect_pair_format(record: dict) -> str | None:
    """The pair format a record's keys point to, or None."""
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if isinstance(chosen, list) and isinstance(rejected, list):
        return "pair_messages"
    if isinstance(chosen, str) and isinstance(rejected, str):
        return "pairs" if "prompt" in record else "hh_rlhf"
    return None


def looks_like(record: dict) -> str:
    """What a record looks like, for an error naming a source given to the wrong objective."""
    keys = ", ".join(sorted(record)[:8])
    pair_format = detect_pair_format(record)
    if pair_format is not None:
        return f"preference pairs ({pair_format}: keys {keys})"
    sft_format = detect_format(record)
    if sft_format is not None:
        return f"{sft_format} conversations (keys {keys})"
    return f"records of an unknown format (keys {keys})"


def check_source_kind(source_name: str, file: str, fmt: str, first_record: dict | None, objective: str) -> None:
    """UserError when a source's format or first record does not fit the objective: pairs for an SFT run,
    or conversations for a preference run. Called before Ray starts, on each source's first file."""
    preference = objective != "sft"
    if fmt not in ("auto", "mapped"):
        if is_preference_format(fmt) != preference:
            kind = "preference pairs" if is_preference_format(fmt) else "conversations"
            raise UserError(f"source '{source_name}': format {fmt} holds {kind}, but train.objective is "
                            f"{objective}; {_what_to_do(preference)}")
        return
    if first_record is None or fmt == "mapped":
        return
    is_pair = detect_pair_format(first_record) is not None
    if is_pair != preference and (is_pair or detect_format(first_record) is not None):
        raise UserError(f"source '{source_name}': {file} looks like {looks_like(first_record)}, but "
                        f"train.objective is {objective}; {_what_to_do(preference)}")


def _what_to_do(preference: bool) -> str:
    if preference:
        return "a preference objective needs chosen/rejected pairs (formats pairs, pair_messages, hh_rlhf)"
    return "set train.objective to dpo, ipo, cdpo, simpo or orpo to train on pairs, or give conversations"


def first_record(file: str, max_record_bytes: int) -> dict | None:
    """The first record of a file that parses as a JSON object (Parquet row), or None."""
    for item in iter_raw_records(file, max_record_bytes):
        if item.error is None:
            return item.value
    return None


def validate_pair_field_map(source_name: str, fmt: str, field_map: dict[str, str] | None) -> None:
    """UserError if a preference source's field_map does not fit its format; call it before reading."""
    keys = mapped_field_map_keys(source_name, fmt, field_map, PAIR_MAPPED_KEYS,
                                 example="{prompt: question, chosen: good, rejected: bad}",
                                 kind=" for preference pairs")
    if keys is not None and not {"chosen", "rejected"} <= keys:
        raise UserError(f"source '{source_name}': field_map: needs 'chosen' and 'rejected'")


# ---------------------------------------------------------------- normalising


def normalise_pair(record: dict, fmt: str, field_map: dict[str, str] | None = None) -> dict:
    """{prompt: messages, chosen: str, rejected: str} for one record; raises RecordError saying what is wrong."""
    if fmt == "mapped":
        renamed = {k: v for k, v in record.items() if k not in PAIR_MAPPED_KEYS}
        renamed.update({ours: record[theirs] for ours, theirs in (field_map or {}).items() if theirs in record})
        record, fmt = renamed, "auto"
    if fmt == "auto":
        fmt = detect_pair_format(record)
        if fmt is None:
            raise RecordError(_undetectable(record))
    pair = PAIR_READERS[fmt](record)
    system = _field(record, "system", required=False)
    if system and not any(m["role"] == "system" for m in pair["prompt"]):
        pair["prompt"] = [{"role": "system", "content": system}] + pair["prompt"]
    return checked_pair(pair)


def _undetectable(record: dict) -> str:
    if detect_format(record) is not None:
        return f"not a preference pair: looks like {looks_like(record)}; a pair needs chosen and rejected"
    keys = ", ".join(sorted(record)[:10]) or "none"
    return f"cannot detect a pair format from keys [{keys}]; set the source's format (and field_map)"


def _side(record: dict, key: str) -> str:
    if key not in record or record[key] is None:
        raise RecordError(f"missing field '{key}'")
    if not isinstance(record[key], str):
        raise RecordError(f"field '{key}' is {json_type_name(record[key])}, expected a string")
    return record[key]


def _prompt_messages(record: dict) -> list[dict]:
    prompt = record.get("prompt")
    if prompt is None:
        return []
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}] if prompt.strip() else []
    if isinstance(prompt, list):
        return _conversation(prompt, "prompt")
    raise RecordError(f"field 'prompt' is {json_type_name(prompt)}, expected a string or a message list")


def _conversation(turns: list, key: str) -> list[dict]:
    """A message list in either turn shape ({role, content} or {from, value}), roles made canonical."""
    if turns and isinstance(turns[0], dict) and "from" in turns[0]:
        messages = _sharegpt_turns(turns, key)
    else:
        messages = _openai_messages(turns, key)
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _pairs(record: dict) -> dict:
    return {"prompt": _prompt_messages(record), "chosen": _side(record, "chosen"),
            "rejected": _side(record, "rejected")}


def _pair_messages(record: dict) -> dict:
    sides = {}
    for key in ("chosen", "rejected"):
        turns = record.get(key)
        if not isinstance(turns, list):
            raise RecordError(f"field '{key}' is {json_type_name(turns)}, expected a message list")
        if not turns:
            raise RecordError(f"empty {key} side: '{key}' is an empty list")
        sides[key] = _conversation(turns, key)
    chosen, rejected = sides["chosen"], sides["rejected"]
    for key, messages in sides.items():
        if messages[-1]["role"] != "assistant":
            raise RecordError(f"the {key} conversation ends with a {messages[-1]['role']} message, not the "
                              "assistant answer to compare")
    prompt = chosen[:-1]
    if chosen[:-1] != rejected[:-1]:
        at = next((i for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])) if a != b),
                  min(len(chosen), len(rejected)) - 1)
        raise RecordError(f"no shared prompt: chosen and rejected differ at message {at}, before their last "
                          "assistant turn")
    if not prompt:
        prompt = _prompt_messages(record)
    return {"prompt": prompt, "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}


def parse_transcript(text: str, key: str) -> list[dict]:
    """HH-RLHF's "\\n\\nHuman: ...\\n\\nAssistant: ..." text as messages; RecordError on text it cannot split."""
    parts = HH_TURN.split(text)
    # parts: [text before the first marker, role, content, role, content, ...]
    if parts[0].strip():
        raise RecordError(f"unknown roles: the {key} transcript starts with {parts[0].strip()[:40]!r}, not a "
                          "'Human:' or 'Assistant:' turn")
    if len(parts) < 3:
        raise RecordError(f"unknown roles: the {key} transcript has no 'Human:' or 'Assistant:' turns")
    return [{"role": HH_ROLES[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def _hh_rlhf(record: dict) -> dict:
    chosen = parse_transcript(_side(record, "chosen"), "chosen")
    rejected = parse_transcript(_side(record, "rejected"), "rejected")
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise RecordError(f"the {key} transcript ends with a Human turn, not the assistant answer to compare")
    if chosen[:-1] != rejected[:-1]:
        raise RecordError("no shared prompt: the chosen and rejected transcripts differ before their last "
                          "Assistant turn")
    return {"prompt": chosen[:-1], "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}


PAIR_READERS = {"pairs": _pairs, "pair_messages": _pair_messages, "hh_rlhf": _hh_rlhf}


def checked_pair(pair: dict) -> dict:
    """The pair, if it is something to learn a preference from."""
    for key in ("chosen", "rejected"):
        if not pair[key].strip():
            raise RecordError(f"empty {key} response")
    if pair["chosen"].strip() == pair["rejected"].strip():
        raise RecordError("chosen is identical to rejected: nothing to prefer")
    if not any(m["role"] == "user" for m in pair["prompt"]):
        raise RecordError("no shared prompt: the pair has no user message before its responses")
    for message in pair["prompt"]:
        if message["role"] not in ("system", "user", "assistant"):
            raise RecordError(f"unknown role {message['role']!r} in the prompt")
    for key, text in [("chosen", pair["chosen"]), ("rejected", pair["rejected"])] + \
            [(f"prompt message {i}", m["content"]) for i, m in enumerate(pair["prompt"])]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone '\udXXX' escape decodes to text Arrow cannot store
            raise RecordError(f"{key} holds an unpaired surrogate at character {e.start}") from None
    return pair


def pair_conversations(pair: dict) -> tuple[list[dict], list[dict]]:
    """(prompt + chosen answer, prompt + rejected answer) as message lists."""
    return ([*pair["prompt"], {"role": "assistant", "content": pair["chosen"]}],
            [*pair["prompt"], {"role": "assistant", "content": pair["rejected"]}])


# ---------------------------------------------------------------- records


def make_pair(id: str, source: str, domain: str, pair: dict, metadata: dict | None = None) -> dict:
    return {"id": id, "source": source, "domain": domain,
            "prompt": [{"role": m["role"], "content": m["content"]} for m in pair["prompt"]],
            "chosen": pair["chosen"], "rejected": pair["rejected"],
            "metadata": json.dumps(metadata or {}, sort_keys=True)}


def to_pairs(raw_items: Iterable[RawItem], source_name: str, domain: str, fmt: str,
             field_map: dict[str, str] | None, file: str) -> Iterator[tuple[str, dict]]:
    """("kept", canonical pair) or ("rejected", reject) for every record read, in file order."""
    basename = os.path.basename(file.rstrip("/"))
    for item in raw_items:
        if item.error is not None:
            yield "rejected", make_reject(source_name, file, item.position, "read", item.error, item.raw)
            continue
        try:
            pair = normalise_pair(item.value, fmt, field_map)
        except RecordError as e:
            example = item.raw or json.dumps(item.value, ensure_ascii=False, default=str)[:EXAMPLE_CHARS]
            yield "rejected", make_reject(source_name, file, item.position, "normalise", str(e), example)
            continue
        own_domain = item.value.get("domain")
        pair_domain = own_domain if isinstance(own_domain, str) and own_domain.strip() else domain
        yield "kept", make_pair(f"{source_name}:{basename}:{item.position}", source_name, pair_domain, pair,
                                record_metadata(item.value))


def read_pairs(file: str, source_name: str, domain: str, fmt: str, field_map: dict[str, str] | None,
               max_record_bytes: int) -> Iterator[tuple[str, dict]]:
    """One file, read and normalised into pairs: what the data stage runs per file inside a Ray task."""
    return to_pairs(iter_raw_records(file, max_record_bytes), source_name, domain, fmt, field_map, file)


assert not set(PAIR_FORMATS) & set(FORMATS), "a pair format shares a name with a conversation format"


def check_sources_kind(sources, objective: str, max_record_bytes: int) -> None:
    """check_source_kind for every configured source, on the first record of its first file when its format is
    auto; for a preference objective, the field maps too. UserError before Ray starts."""
    from instune.data.read import expand_paths

    for source in sources:
        files = expand_paths(source.name, source.path)
        record = first_record(files[0], max_record_bytes) if source.format == "auto" else None
        check_source_kind(source.name, files[0], source.format, record, objective)
        if objective != "sft":
            validate_pair_field_map(source.name, source.format, source.field_map)
