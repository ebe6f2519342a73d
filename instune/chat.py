"""`instune chat MODEL`: talk to a merged model or a tuned adapter with its chat template, interactively or over
a JSONL file of prompts; the quick look after training.

Loading and generation are eval's (eval/load.py, eval/evaluate.generate_answers): the same template, the same
decoding settings, the same tokenizer (the one training saved beside the adapter or merged model). MODEL may
be a directory, a Hub id or a bucket URI (model_source.py).

A prompts file holds one JSON object per line, any of:
  {"prompt": "..."}                          one user turn
  {"turns": ["...", "..."]}                  user turns in order, each answered before the next (MT-Bench)
  {"instruction": "...", "input": "..."}     Alpaca, without the output
  {"messages": [{"role": ..., "content": ...}, ...]}   a conversation ending with a user turn
each optionally with "system". Every line comes back with "messages" (the whole conversation) and
"responses" (the model's answers) added.

With `--config` of a run trained with outcome markers (negative-aware training), every prompt carries the success
marker as eval's do (eval.outcome_marker, stages.eval_prompt_marker); without `--config`, when the model's local
directory has the outcome_markers.json that export writes for such a run. The conversations written back are the
user's, without it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from instune.errors import UserError

RESET, EXIT = "/reset", "/exit"


@dataclass
class Conversation:
    """One prompt record: the messages so far and the user turns still to answer."""

    record: dict
    messages: list[dict]
    pending: list[str]
    responses: list[str] = field(default_factory=list)


def _text(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: expected non-empty text, got {value!r}"[:300])
    return value


def conversation_from(record, where: str, system: str | None) -> Conversation:
    """The Conversation a prompts-file line asks for; UserError naming `where` (file and line) otherwise."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    system = record.get("system", system)
    start = [{"role": "system", "content": _text(system, f"{where}: system")}] if system else []
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") for m in messages):
            raise UserError(f"{where}: messages must be a list of {{role: system|user|assistant, content}}")
        if messages[-1]["role"] != "user":
            raise UserError(f"{where}: the last message is from {messages[-1]['role']}; end with a user turn")
        history = [{"role": m["role"], "content": _text(m.get("content"), f"{where}: messages[{i}].content")}
                   for i, m in enumerate(messages)]
        if history[0]["role"] == "system":
            start = []
        return Conversation(record, start + history[:-1], [history[-1]["content"]])
    if "turns" in record:
        turns = record["turns"]
        if not isinstance(turns, list) or not turns:
            raise UserError(f"{where}: turns must be a non-empty list of user turns")
        return Conversation(record, start, [_text(t, f"{where}: turns[{i}]") for i, t in enumerate(turns)])
    if "prompt" in record:
        return Conversation(record, start, [_text(record["prompt"], f"{where}: prompt")])
    if "instruction" in record:
        instruction = _text(record["instruction"], f"{where}: instruction")
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise UserError(f"{where}: input: expected text, got {json.dumps(extra)}"[:300])
        return Conversation(record, start, [f"{instruction}\n\n{extra}" if extra.strip() else instruction])
    raise UserError(f"{where}: no prompt, turns, instruction or messages field")


def read_prompts(path: str | Path, system: str | None) -> list[Conversation]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--prompts: {path} is not a file")
    conversations = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"--prompts: {path} line {number}: not valid JSON ({e.msg})") from None
        conversations.append(conversation_from(record, f"--prompts: {path} line {number}", system))
    if not conversations:
        raise UserError(f"--prompts: {path} holds no prompts")
    return conversations


def answer_all(model, tokenizer, conversations: list[Conversation], settings, batch_size: int,
               markers=None) -> None:
    """Answer every pending user turn, round by round: each conversation's next turn sees its earlier answers.
    Batches follow eval's generation (left padding, the template's generation prompt). With `markers`
    (data.outcome.OutcomeMarkers) each prompt carries their success text, where training put it."""
    from instune.data.outcome import with_marker
    from instune.eval.evaluate import generate_answers

    round_number = 0
    while True:
        active = [c for c in conversations if round_number < len(c.pending)]
        if not active:
            return
        for c in active:
            c.messages.append({"role": "user", "content": c.pending[round_number]})
        for start in range(0, len(active), batch_size):
            batch = active[start:start + batch_size]
            # Seeded by position, as eval's batches are, so a rerun draws the same sampled answers.
            # Marked afresh each round from the unmarked history, so the marker is in the prompt once.
            prompts = [with_marker(c.messages, markers.success, markers.position) if markers else c.messages
                       for c in batch]
            answers = generate_answers(model, tokenizer, prompts, settings,
                                       settings.seed + round_number * len(conversations) + start)
            for c, answer in zip(batch, answers):
                answer = answer.strip()
                c.responses.append(answer)
                c.messages.append({"role": "assistant", "content": answer})
        round_number += 1


def chat_lines(conversations: list[Conversation]) -> str:
    return "".join(json.dumps({**c.record, "messages": c.messages, "responses": c.responses},
                              ensure_ascii=False) + "\n" for c in conversations)


def interact(model, tokenizer, settings, system: str | None, read=input, write=print, markers=None) -> int:
    """A conversation on the terminal until end of input or /exit; /reset starts over. Returns the turns
    answered."""
    start = [{"role": "system", "content": system}] if system else []
    messages, answered = list(start), 0
    write(f"Type a message; {RESET} starts a new conversation, {EXIT} (or end of input) leaves.")
    while True:
        try:
            text = read("you> ")
        except EOFError:
            return answered
        if text.strip() == EXIT:
            return answered
        if text.strip() == RESET:
            messages = list(start)
            continue
        if not text.strip():
            continue
        conversation = Conversation({}, messages, [text])
        answer_all(model, tokenizer, [conversation], settings, batch_size=1, markers=markers)
        messages = conversation.messages
        answered += 1
        write(f"model> {conversation.responses[-1]}")


# `chat` fields chat_settings does not take, and where they go instead (tests/test_chat.py checks that every
# other chat field reaches EvalSettings).
NOT_IN_CHAT_SETTINGS = {"chat.system": "the conversations' first message (read_prompts, talk)"}


def trained_markers(model_source: str):
    """The outcome markers recorded beside a local model or adapter that training exported (train/export.py),
    or None: a Hub id or bucket URI carries its record only once downloaded, so without a config none is used."""
    from instune.data.outcome import read_markers_file

    return read_markers_file(model_source) if Path(model_source).is_dir() else None


def chat_settings(model_config, chat_config):
    """eval's EvalSettings from `model` (max_length, dtype) and `chat` (the decoding settings), field by name as
    eval fills them (config.settings_from): chat answers as eval generates."""
    from instune.config import settings_from
    from instune.eval.evaluate import EvalSettings

    return settings_from(EvalSettings, {"model": model_config, "chat": chat_config})


def chat_command(model_source: str, model_config, chat_config, prompts: str | None, output: str | None,
                 markers=None) -> None:
    """`instune chat`: check and load the model (an adapter on its base: model.path when a config gives one,
    else the base its adapter_config.json names), then answer a prompts file or talk on the terminal.
    `markers`: the outcome markers whose success text every prompt carries (stages.eval_prompt_marker), or None."""
    import torch

    from instune.atomic import write_text
    from instune.eval.load import check_eval_model, is_adapter_dir, load_model_and_tokenizer

    base = model_config.path if model_config.path and is_adapter_dir(model_source, "MODEL") else None
    model_source = check_eval_model(model_source, base, "MODEL")
    conversations = read_prompts(prompts, chat_config.system) if prompts else None
    settings = chat_settings(model_config, chat_config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model_and_tokenizer(model_source, base, settings.dtype, device)
    if model_config.chat_template:  # as training rendered its data (base_model.resolve_base_model)
        from instune.data.chat_template import read_template

        tokenizer.chat_template = read_template(model_config.chat_template)
    if not tokenizer.chat_template:
        raise UserError(f"MODEL: the tokenizer of {model_source} has no chat template; give the adapter or merged "
                        "model that training wrote (it carries the template the data was rendered with), or set "
                        "model.chat_template")
    if markers is not None:
        from instune.eval.outcome_marker import marker_note

        print(f"[chat] {marker_note(markers, trained_with_markers=True)}", file=sys.stderr)
    if conversations is None:
        interact(model, tokenizer, settings, chat_config.system, markers=markers)
        return
    answer_all(model, tokenizer, conversations, settings, chat_config.batch_size, markers)
    if output:
        write_text(output, chat_lines(conversations))
        print(f"[chat] {sum(len(x.responses) for x in conversations)} answers to {len(conversations)} "
              f"prompts: {output}", file=sys.stderr)
    else:
        sys.stdout.write(chat_lines(conversations))
