"""Format adapters: one raw record (a dict) -> canonical messages, and raw items -> canonical records/rejects.

Formats (the `format` of a source):
    alpaca      instruction, input, output[, system]      user = instruction + blank line + input
    sharegpt    conversations (or items): [{from, value}]  roles via ROLE_ALIASES[, system]
    openai      messages: [{role, content}]               content may be [{type: text, text}] parts
    dolly       instruction, context, response[, category] user = instruction + blank line + context
    completion  text                                      ONE assistant message: all of the text is trained on
    mapped      field_map from alpaca names (instruction, input, output, system) or `messages` to the record's
    auto        detect_format() from the keys

Alpaca seed tasks (instruction + instances[{input, output}]) are expanded into one Alpaca record per instance
under `auto` and `alpaca`. A record that breaks a rule raises `RecordError`; `to_canonical` turns it into a
reject, so one bad record never stops a file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

from instune.data.read import RawItem, iter_raw_records, json_type_name
from instune.data.schema import EXAMPLE_CHARS, make_record, make_reject
from instune.errors import UserError

# Role names seen in the wild -> canonical role. Lookup is case-insensitive.
ROLE_ALIASES = {
    "system": "system",
    "developer": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
}
ALPACA_FIELDS = {"instruction": "instruction", "input": "input", "output": "output", "system": "system"}
MAPPED_KEYS = ("instruction", "input", "output", "system", "messages")
# Label-like fields carried into a record's metadata (the original "id" is kept as "original_id").
METADATA_FIELDS = ("category", "domain", "label", "outcome", "task", "name")


class RecordError(ValueError):
    """One record cannot be normalised; the message is the reject reason (one line)."""


# ---------------------------------------------------------------- detection and dispatch


def detect_format(record: dict) -> str | None:
    """The format a record's keys point to, or None."""
    if isinstance(record.get("messages"), list):
        return "openai"
    if isinstance(record.get("conversations"), list) or isinstance(record.get("items"), list):
        return "sharegpt"
    if "instruction" in record and "response" in record:
        return "dolly"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "completion"
    return None


def normalise(record: dict, fmt: str, field_map: dict[str, str] | None = None) -> list[dict]:
    """The record's messages [{role, content}]; raises RecordError saying what is wrong."""
    if fmt == "auto":
        detected = detect_format(record)
        if detected is None:
            raise RecordError(_undetectable_reason(record))
        fmt = detected
    if fmt == "mapped":
        messages = _mapped(record, field_map or {})
    elif fmt in FORMATS:
        messages = FORMATS[fmt](record)
    else:
        raise ValueError(f"unknown format {fmt!r}")  # config validation keeps this from happening
    return _checked(messages)


def _undetectable_reason(record: dict) -> str:
    turns = record.get("turns")
    if isinstance(turns, list):  # MT-Bench-style questions: user turns, answers kept elsewhere
        return f"no assistant message: 'turns' holds {len(turns)} user prompt(s) and no answers"
    keys = ", ".join(sorted(record)[:10]) or "none"
    return f"cannot detect the format from keys [{keys}]; set the source's format (and field_map)"


def validate_field_map(source_name: str, fmt: str, field_map: dict[str, str] | None) -> None:
    """Raise UserError if a source's field_map does not fit its format; call it before reading."""
    keys = mapped_field_map_keys(source_name, fmt, field_map, MAPPED_KEYS,
                                 example="{instruction: question, output: answer}")
    if keys is None:
        return
    where = f"source '{source_name}': field_map"
    if "messages" in keys:
        if keys - {"messages", "system"}:
            raise UserError(f"{where}: 'messages' maps a whole conversation; only 'system' may go with it")
    elif not {"instruction", "output"} <= keys:
        raise UserError(f"{where}: needs 'instruction' and 'output' (or 'messages')")


def mapped_field_map_keys(source_name: str, fmt: str, field_map: dict[str, str] | None, allowed: tuple[str, ...],
                          example: str, kind: str = "") -> set[str] | None:
    """The keys of a source's field_map when its format is mapped, else None; raises UserError for the faults
    conversations and preference pairs share: a map without format mapped, none with it, a key not in allowed."""
    where = f"source '{source_name}': field_map"
    if fmt != "mapped":
        if field_map:
            raise UserError(f"{where} is only used with format: mapped (format is {fmt})")
        return None
    if not field_map:
        raise UserError(f"{where} is required with format: mapped, e.g. {example}")
    unknown = sorted(set(field_map) - set(allowed))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}{kind}; use {', '.join(allowed)}")
    return set(field_map)


# ---------------------------------------------------------------- field access


def _field(record: dict, key: str, required: bool = True) -> str:
    """The string in record[key]; '' when optional and missing or null."""
    if key not in record or record[key] is None:
        if required:
            raise RecordError(f"missing field '{key}'")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise RecordError(f"field '{key}' is {json_type_name(value)}, expected a string")
    return value


def _join(first: str, second: str) -> str:
    return f"{first}\n\n{second}" if first and second else first or second


def _message(role: str, content: str, where: str) -> dict:
    # `where` names the field the content came from, for reasons; _checked drops it.
    return {"role": role, "content": content, "where": where}


def _system(record: dict, key: str | None) -> list[dict]:
    system = _field(record, key, required=False) if key else ""
    return [_message("system", system, key)] if system else []


def _array(record: dict, key: str, what: str = "") -> list:
    value = record.get(key)
    if key not in record:
        raise RecordError(f"missing field '{key}'{what}")
    if not isinstance(value, list):
        raise RecordError(f"field '{key}'{what} is {json_type_name(value)}, expected an array")
    if not value:
        raise RecordError(f"empty conversation: '{key}' is an empty array")
    return value


def _role(name, where: str) -> str:
    if not isinstance(name, str):
        raise RecordError(f"{where} role is {json_type_name(name)}, expected a string")
    role = ROLE_ALIASES.get(name.strip().lower())
    if role is None:
        raise RecordError(f"unknown role {name!r} in {where}")
    return role


# ---------------------------------------------------------------- formats


def _alpaca(record: dict, fields: dict[str, str] = ALPACA_FIELDS) -> list[dict]:
    """`fields` maps the alpaca names to the record's keys (the identity, or a source's field_map)."""

    def get(name: str, required: bool = False) -> str:
        return _field(record, fields[name], required) if name in fields else ""

    prompt = _join(get("instruction", required=True), get("input"))
    if not prompt.strip():
        raise RecordError(f"empty prompt: '{fields['instruction']}' and '{fields.get('input', 'input')}' are empty")
    answer = _message("assistant", get("output", required=True), f"'{fields['output']}'")
    return _system(record, fields.get("system")) + [_message("user", prompt, "prompt"), answer]


def _dolly(record: dict) -> list[dict]:
    prompt = _join(_field(record, "instruction"), _field(record, "context", required=False))
    if not prompt.strip():
        raise RecordError("empty prompt: 'instruction' and 'context' are empty")
    return [_message("user", prompt, "prompt"), _message("assistant", _field(record, "response"), "'response'")]


def _completion(record: dict) -> list[dict]:
    # No user turn: an empty prompt would teach nothing, and completion data is trained on all of its text.
    return [_message("assistant", _field(record, "text"), "'text'")]


def _sharegpt(record: dict) -> list[dict]:
    key = "items" if "items" in record and "conversations" not in record else "conversations"
    return _system(record, "system") + _sharegpt_turns(_array(record, key), key)


def _sharegpt_turns(turns: list, key: str) -> list[dict]:
    messages = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(f"{where} is {json_type_name(turn)}, expected an object with 'from' and 'value'")
        if "from" not in turn or "value" not in turn:
            raise RecordError(f"{where} lacks 'from' or 'value'")
        content = turn["value"]
        if not isinstance(content, str):
            raise RecordError(f"{where}.value is {json_type_name(content)}, expected a string")
        messages.append(_message(_role(turn["from"], where), content, where))
    return messages


def _openai(record: dict) -> list[dict]:
    return _openai_messages(_array(record, "messages"), "messages")


def _openai_messages(messages: list, key: str) -> list[dict]:
    out = []
    for i, message in enumerate(messages):
        where = f"{key}[{i}]"
        if not isinstance(message, dict):
            raise RecordError(f"{where} is {json_type_name(message)}, expected an object with 'role' and 'content'")
        if "role" not in message:
            raise RecordError(f"{where} lacks 'role'")
        role = _role(message["role"], where)
        out.append(_message(role, _openai_content(message.get("content"), where), where))
    return out


def _openai_content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RecordError(f"{where}.content is {json_type_name(content)}, expected a string or text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise RecordError(f"{where}.content[{j}] is not a text part ({{type: text, text: ...}}); got {kind!r}")
        texts.append(part["text"])
    return "\n".join(texts)  # parts are separate passages of one message


def _mapped(record: dict, field_map: dict[str, str]) -> list[dict]:
    if "messages" in field_map:
        key = field_map["messages"]
        turns = _array(record, key, " (mapped to messages)")
        # The conversation may use either turn shape.
        sharegpt_shape = isinstance(turns[0], dict) and "from" in turns[0]
        messages = _sharegpt_turns(turns, key) if sharegpt_shape else _openai_messages(turns, key)
        return _system(record, field_map.get("system")) + messages
    return _alpaca(record, field_map)


FORMATS = {"alpaca": _alpaca, "sharegpt": _sharegpt, "openai": _openai, "dolly": _dolly, "completion": _completion}


def _checked(messages: list[dict]) -> list[dict]:
    """The messages without their `where`, if they are something to train on."""
    if not any(m["role"] == "assistant" for m in messages):
        roles = ", ".join(sorted({m["role"] for m in messages}))
        raise RecordError(f"no assistant message (nothing to train on): only {roles}")
    for message in messages:
        if message["role"] == "assistant" and not message["content"].strip():
            raise RecordError(f"empty assistant content in {message['where']}")
        try:
            message["content"].encode("utf-8")
        except UnicodeEncodeError as e:  # a lone '\udXXX' escape decodes to text Arrow cannot store
            raise RecordError(f"{message['where']} holds an unpaired surrogate at character {e.start}") from None
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# ---------------------------------------------------------------- records


def expand_instances(record: dict, fmt: str) -> list[tuple[str, dict]]:
    """[(position suffix, record)]: one Alpaca record per instance of a seed task, else [("", record)]."""
    if fmt not in ("auto", "alpaca") or "instances" not in record or "instruction" not in record:
        return [("", record)]
    instances = record["instances"]
    if not isinstance(instances, list) or not instances:
        raise RecordError("field 'instances' must be a non-empty array of {input, output}")
    parent = {k: v for k, v in record.items() if k != "instances"}
    expanded = []
    for k, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise RecordError(f"instances[{k}] is {json_type_name(instance)}, expected an object")
        fields = {"input": instance.get("input"), "output": instance.get("output")}
        expanded.append((f" instance {k}", {**parent, **fields}))
    return expanded


def record_metadata(record: dict) -> dict:
    """The record's label-like scalar fields, and its own id as original_id."""
    metadata = {k: record[k] for k in METADATA_FIELDS if isinstance(record.get(k), (str, int, float, bool))}
    if isinstance(record.get("id"), (str, int)):
        metadata["original_id"] = record["id"]
    return metadata


def to_canonical(
    raw_items: Iterable[RawItem],
    source_name: str,
    domain: str,
    fmt: str,
    field_map: dict[str, str] | None,
    file: str,
) -> Iterator[tuple[str, dict]]:
    """("kept", canonical record) or ("rejected", reject) for every record read, in file order."""
    basename = os.path.basename(file.rstrip("/"))
    for item in raw_items:
        if item.error is not None:
            yield "rejected", make_reject(source_name, file, item.position, "read", item.error, item.raw)
            continue
        try:
            expanded = expand_instances(item.value, fmt)
        except RecordError as e:
            yield "rejected", make_reject(source_name, file, item.position, "normalise", str(e), _example(item))
            continue
        for suffix, value in expanded:
            position = item.position + suffix
            try:
                messages = normalise(value, fmt, field_map)
            except RecordError as e:
                yield "rejected", make_reject(source_name, file, position, "normalise", str(e), _example(item))
                continue
            own_domain = value.get("domain")
            record_domain = own_domain if isinstance(own_domain, str) and own_domain.strip() else domain
            record_id = f"{source_name}:{basename}:{position}"
            yield "kept", make_record(record_id, source_name, record_domain, messages, record_metadata(value))


def _example(item: RawItem) -> str:
    return item.raw or json.dumps(item.value, ensure_ascii=False, default=str)[:EXAMPLE_CHARS]


def read_canonical(
    file: str,
    source_name: str,
    domain: str,
    fmt: str,
    field_map: dict[str, str] | None,
    max_record_bytes: int,
) -> Iterator[tuple[str, dict]]:
    """One file, read and normalised: what the data stage runs per file inside a Ray task."""
    return to_canonical(iter_raw_records(file, max_record_bytes), source_name, domain, fmt, field_map, file)


@dataclass(frozen=True)
class FileCounts:
    read: int  # records read: raw items, with a seed task counted once per instance
    kept: int
    rejected: int


def count_file(
    file: str,
    source_name: str,
    domain: str,
    fmt: str,
    field_map: dict[str, str] | None,
    max_record_bytes: int,
) -> FileCounts:
    """Read and normalise one file, counting; asserts every record read was either kept or rejected."""
    read = 0

    def counted(items: Iterable[RawItem]) -> Iterator[RawItem]:
        nonlocal read
        for item in items:
            try:
                read += 1 if item.value is None else len(expand_instances(item.value, fmt))
            except RecordError:
                read += 1
            yield item

    outcomes = {"kept": 0, "rejected": 0}
    raw_items = counted(iter_raw_records(file, max_record_bytes))
    for outcome, _ in to_canonical(raw_items, source_name, domain, fmt, field_map, file):
        outcomes[outcome] += 1
    counts = FileCounts(read, outcomes["kept"], outcomes["rejected"])
    assert counts.read == counts.kept + counts.rejected, f"{file}: read {read} != kept + rejected {counts}"
    return counts
