"""Chat templates: render a conversation and find what to train on in the render.

What is trained on, for every assistant turn: its content and the end-of-turn text the template writes right
after it (`<|eot_id|>`, `<|im_end|>`, `<end_of_turn>`, `</s>`, `<|END_RESPONSE|><|END_OF_TURN_TOKEN|>`), with the
whitespace after it cut off. Not the header or template text before the content (`<|im_start|>assistant\\n`, an
empty `<think></think>` block), not the newline after the end-of-turn token, not the next turn's header.

`place_turns` finds these spans, for any template, in this order:
1. A template with `{% generation %}` markers is taken at its word: the spans are what it marks (transformers'
   assistant-token mask).
2. A template with a fixed layout (TurnLayout: ChatML, Llama 3, Gemma, Phi, ...) places every turn from one
   render.
3. Otherwise each assistant turn i is aligned by content: the prompt the model sees at inference,
   P = render(messages[:i], add_generation_prompt=True), must begin the full render, and the turn's content
   followed by its end-of-turn text (read off render(messages[:i+1])) must follow P there.
   Where a template rewrites history, so that the full render does not continue P with the turn (Mistral v3
   writes the system prompt only into the last user turn; reasoning stripped from earlier Qwen 3 turns),
   that turn is **expanded**: it becomes an example of its own, P followed by the turn as the template
   renders it when the turn is the last. The full render keeps the turns it does hold.
A template that raises on a record (a role it does not support, two user turns in a row) rejects that record
with the template's message, unless a safe convention applies: system text joins the first user turn when the
template refuses a system message (Gemma 1/2); consecutive same-role turns are joined when the config asks.
Each adjustment is named in the result (`Placed.notes`), and counted in the data report.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

NAMED_TEMPLATES_DIR = Path(__file__).parent / "chat_templates"
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

# Names of the adjustments a record can get (Placed.notes), as the data report counts them.
EXPANDED = "expanded: turns the full render rewrites trained as examples of their own"
SYSTEM_JOINED = "system text joined the first user turn (the template refuses a system turn)"
TURNS_JOINED = "consecutive same-role turns joined"


class TemplateRejected(ValueError):
    """A record the chat template cannot render or whose assistant turns cannot be found in the render."""


# ---------------------------------------------------------------- templates by name


def named_templates() -> list[str]:
    return sorted(p.stem for p in NAMED_TEMPLATES_DIR.glob("*.jinja"))


def read_template(value: str) -> str:
    """The template text `value` names: a bundled template's name, or a path to a .jinja file.
    ValueError (one line) for neither."""
    if value.endswith(".jinja") or "/" in value:
        path = Path(value).expanduser()
        if not path.is_file():
            raise ValueError(f"{value} is not a file (expected a .jinja chat template)")
        return path.read_text(encoding="utf-8")
    path = NAMED_TEMPLATES_DIR / f"{value}.jinja"
    if not path.is_file():
        raise ValueError(f"{value!r} is no bundled template (one of: {', '.join(named_templates())}) "
                         "and no .jinja path")
    return path.read_text(encoding="utf-8")


def has_chat_template(tokenizer_dir: str | Path) -> bool:
    """Whether the tokenizer saved in `tokenizer_dir` carries a chat template, read from its files (transformers
    keeps it in tokenizer_config.json, or beside it in chat_template.jinja / chat_template.json)."""
    import json

    directory = Path(tokenizer_dir)
    if (directory / "chat_template.jinja").is_file() or (directory / "chat_template.json").is_file():
        return True
    config = directory / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))


def tokenizer_with_template(tokenizer_dir: str | Path, template: str, directory: Path) -> str:
    """`directory`, holding the tokenizer of `tokenizer_dir` with `template` as its chat template: every stage,
    Ray worker and exported model then loads the template with the tokenizer, as for a model that ships one.
    Written again only when the tokenizer or the template changed."""
    import hashlib

    from instune.atomic import atomic_dir

    stamp = hashlib.blake2b(f"{Path(tokenizer_dir).resolve()}\0{template}".encode(), digest_size=16).hexdigest()
    if (directory / ".instune_template").is_file() and \
            (directory / ".instune_template").read_text(encoding="utf-8") == stamp:
        return str(directory.resolve())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.chat_template = template
    with atomic_dir(directory) as tmp:
        tokenizer.save_pretrained(str(tmp))
        (tmp / ".instune_template").write_text(stamp, encoding="utf-8")
    return str(directory.resolve())


# ---------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=8)
def _compiled_template(template: str):
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(template)


def template_variables(tokenizer) -> dict:
    """The special tokens `apply_chat_template` passes to the template (bos_token, eos_token, ...)."""
    return {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, (str, list))}


def _direct_render(template: str, variables: dict):
    return functools.partial(_compiled_template(template).render, tools=None, documents=None, **variables)


_PROBE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"},
          {"role": "assistant", "content": "Bye."}]


def _render_or_error(render, *args, **kwargs) -> str | None:
    """The render, or None where the template raises."""
    try:
        return render(*args, **kwargs)
    except Exception:  # a template's refusal (raise_exception) or its own bug: compared, not raised
        return None


class ChatRenderer:
    """Renders {role, content} conversations with the tokenizer's chat template.

    `apply_chat_template` spends more time normalising its input (message objects, None values, media) than
    jinja spends rendering; our messages are plain strings, so the compiled template is called directly, with
    the same variables. Where the two disagree on a probe conversation (or the template cannot be compiled
    here), every render goes through `apply_chat_template`.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._direct = None
        self.template = tokenizer.get_chat_template()
        self.variables = template_variables(tokenizer)
        try:
            self._direct = _direct_render(self.template, self.variables)
            # With and without a system turn: a template that refuses one (Gemma 2) must refuse it both ways.
            probes = [_PROBE[:k] for k in (2, 3, 5)] + [_PROBE[1:k] for k in (3, 5)]
            renders = [(_render_or_error(self._direct, messages=p, add_generation_prompt=g),
                        _render_or_error(self._slow, p, g)) for p in probes for g in (False, True)]
            if any(direct != slow for direct, slow in renders) or all(slow is None for _, slow in renders):
                self._direct = None
        except Exception:  # any template or version quirk: the slow path is always right
            self._direct = None
        self._learn()

    @classmethod
    def direct(cls, template: str, variables: dict) -> "ChatRenderer":
        """A renderer that only calls the compiled template, for a template a `ChatRenderer(tokenizer)` has
        checked (see TokenizerParts): no tokenizer object, so no transformers import beyond the compiler."""
        render = cls.__new__(cls)
        render.tokenizer, render.template, render.variables = None, template, variables
        render._direct = _direct_render(template, variables)
        render._learn()
        return render

    def _learn(self) -> None:
        eos = self.variables.get("eos_token") if self.variables is not None else None
        self.eos_token = eos if isinstance(eos, str) and eos else None
        self.marks_generation = bool(GENERATION_TAG.search(self.template))
        self.lone_prompt = self._lone_prompt()
        self.layout = None if self.marks_generation else learn_layout(self)

    def _slow(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def __call__(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if self._direct is not None:
            return self._direct(messages=messages, add_generation_prompt=add_generation_prompt)
        return self._slow(messages, add_generation_prompt)

    def generation_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """(render, the character spans inside {% generation %} blocks), as transformers finds them for
        `return_assistant_tokens_mask`."""
        from transformers.utils.chat_template_utils import _render_with_assistant_indices

        return _render_with_assistant_indices(_compiled_template(self.template), messages, None, None, False,
                                              **self.variables)

    def _lone_prompt(self) -> str:
        """The generation prompt before a first-turn answer (plain completions); "" if the template needs a turn."""
        try:
            return self._slow([], True) if self._direct is None else self([], True)
        except Exception:  # templates that index messages[0] raise all sorts of jinja errors on an empty list
            return ""


@dataclass(frozen=True)
class TurnLayout:
    """Where a template puts each message: a fixed start, then every message as fixed text before and after
    its content (by role), and a fixed generation prompt. ChatML, Llama 3 and many others render this way.

    With a layout, one render places every assistant turn: the render is compared with the layout's
    prediction, and the spans follow from the lengths. A layout is only used where it reproduced every prefix
    render of the probe conversations (`learn_layout`), and for a conversation only where it reproduces its
    render.
    """

    start: str
    around: dict[str, tuple[str, str]]  # role -> (text before the content, text after it)
    generation_prompt: str

    def place(self, messages: list[dict]) -> tuple[str, list[int]] | None:
        """(the predicted render, where each message starts plus where the last ends); None for unknown roles."""
        pieces, bounds, at = [self.start], [], len(self.start)
        for message in messages:
            around = self.around.get(message["role"])
            if around is None:
                return None
            bounds.append(at)
            piece = around[0] + message["content"] + around[1]
            pieces.append(piece)
            at += len(piece)
        return "".join(pieces), bounds + [at]

    def assistant_spans(self, messages: list[dict], bounds: list[int], eos_token: str | None
                        ) -> list[tuple[int, int]]:
        before, after = self.around["assistant"]
        end = len(end_of_turn(after, eos_token))
        return [(bounds[i] + len(before), bounds[i] + len(before) + len(m["content"]) + end)
                for i, m in enumerate(messages) if m["role"] == "assistant"]


_LAYOUT_PROBES = (
    [("system", "\u27e6s0\u27e7"), ("user", "\u27e6u1\u27e7"), ("assistant", "\u27e6a2\u27e7"),
     ("user", "\u27e6u3\u27e7"), ("assistant", "\u27e6a4\u27e7")],
    [("user", "\u27e6u5\u27e7"), ("assistant", "\u27e6a6\u27e7"), ("user", "\u27e6u7\u27e7"),
     ("assistant", "\u27e6a8\u27e7")],
    [("assistant", "\u27e6a9\u27e7")],
)


def learn_layout(render: ChatRenderer) -> TurnLayout | None:
    """The template's TurnLayout, read off probe renders; None where any probe render (every prefix of every
    probe, with and without the generation prompt) differs from what the layout predicts."""
    probes = [[{"role": role, "content": content} for role, content in probe] for probe in _LAYOUT_PROBES]
    try:
        start = render([])
        generation_prompt = render([], True)[len(start):]
        if not render([], True).startswith(start):
            return None
        text, around = render(probes[0]), {}
        bounds = [len(render(probes[0][:k])) for k in range(len(probes[0]) + 1)]
        for k, message in enumerate(probes[0]):
            piece = text[bounds[k]:bounds[k + 1]]
            before, found, after = piece.partition(message["content"])
            if not found or around.setdefault(message["role"], (before, after)) != (before, after):
                return None
        layout = TurnLayout(start, around, generation_prompt)
        for probe in probes:
            for k in range(len(probe) + 1):
                placed = layout.place(probe[:k])
                if placed is None or render(probe[:k]) != placed[0] or \
                        render(probe[:k], True) != placed[0] + generation_prompt:
                    return None
        if not around["assistant"][0].startswith(generation_prompt):
            return None
        return layout
    except Exception:  # a template that cannot render an empty or probe conversation: no layout
        return None


# ---------------------------------------------------------------- placing assistant turns


def end_of_turn(after: str, eos_token: str | None) -> str:
    """The end-of-turn text in `after`, what a template writes after an assistant turn's content when the turn
    is the last: up to the first EOS token where it holds one (Command-A writes the next turn's header
    `<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>` after its end of turn, always), without trailing whitespace."""
    if eos_token and eos_token in after:
        return after[:after.index(eos_token) + len(eos_token)]
    return after.rstrip()


@dataclass
class Placed:
    """One record's training examples, each a rendered text and the character spans to train on, and the
    adjustments made to the record (names from the top of this module)."""

    examples: list[tuple[str, list[tuple[int, int]]]]
    notes: tuple[str, ...] = ()


def join_consecutive_turns(messages: list[dict]) -> list[dict]:
    """`messages` with each run of same-role messages joined into one, contents separated by a blank line."""
    joined: list[dict] = []
    for m in messages:
        if joined and joined[-1]["role"] == m["role"]:
            joined[-1] = {"role": m["role"], "content": joined[-1]["content"] + "\n\n" + m["content"]}
        else:
            joined.append(dict(m))
    return joined


def _system_into_first_user(messages: list[dict]) -> list[dict] | None:
    """The Gemma convention: a leading system message's text joins the first user turn; None without one."""
    if len(messages) < 2 or messages[0]["role"] != "system" or messages[1]["role"] != "user":
        return None
    first = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
    return [first] + messages[2:]


def _render_record(messages: list[dict], render: ChatRenderer, join_turns: bool
                   ) -> tuple[list[dict], str, list[str]]:
    """(the messages as rendered, the render, notes): conventions applied where the template needs them."""
    notes = []
    if join_turns and any(a["role"] == b["role"] for a, b in zip(messages, messages[1:])):
        messages = join_consecutive_turns(messages)
        notes.append(TURNS_JOINED)
    try:
        return messages, render(messages), notes
    except Exception as error:  # jinja's TemplateError from raise_exception, or a template's own bug
        refused = error
    merged = _system_into_first_user(messages)
    if merged is not None:
        try:
            return merged, render(merged), notes + [SYSTEM_JOINED]
        except Exception as error:  # rejected with what the template says of the record as it would train
            refused = error
    message = str(refused).strip().splitlines()[0] if str(refused).strip() else type(refused).__name__
    raise TemplateRejected(f"the chat template rejects this record: {message}")


def _content_and_end(rendered: str, content: str, start: int, eos_token: str | None
                     ) -> tuple[int, str, str] | None:
    """(where the turn's content starts in `rendered`, the content as written, its end-of-turn text), for a
    render that ends with this turn: the last place the content (as given, or trimmed as most templates do)
    occurs after `start`; None where the template rewrote it."""
    for written in dict.fromkeys((content, content.strip(), content.rstrip(), content.lstrip())):
        if not written:
            continue
        at = rendered.rfind(written, start)
        if at >= 0:
            return at, written, end_of_turn(rendered[at + len(written):], eos_token)
    return None


def _turn_alone(messages: list[dict], i: int, prompt: str, upto: str, eos_token: str | None
                ) -> tuple[str, tuple[int, int]]:
    """Assistant turn i as an example of its own: the inference prompt, then the turn as the template writes it
    when it is the last (`upto` = render(messages[:i+1]))."""
    content = messages[i]["content"]
    if upto.startswith(prompt):
        found = _content_and_end(upto, content, len(prompt), eos_token)
        if found is not None:
            at, written, end = found
            return upto, (at, at + len(written) + len(end))
        turn = end_of_turn(upto[len(prompt):], eos_token)
        if turn.strip():  # the content rewritten (reasoning reformatted): train on all the turn renders
            return upto, (len(prompt), len(prompt) + len(turn))
    # The template renders earlier messages differently once the turn is written (Mistral v3 moves the system
    # prompt to the last user turn): take what it writes between the previous message and this turn's content
    # in `upto`, less what the prompt already ends with after that message.
    found = _content_and_end(upto, content, 0, eos_token)
    previous = messages[i - 1]["content"].strip() if i else ""
    if found is not None and previous:
        at, written, end = found
        in_upto, in_prompt = upto.rfind(previous, 0, at), prompt.rfind(previous)
        if in_upto >= 0 and in_prompt >= 0:
            between, prompt_tail = upto[in_upto + len(previous):at], prompt[in_prompt + len(previous):]
            if between.startswith(prompt_tail):
                text = prompt + between[len(prompt_tail):]
                return text + written + end, (len(text), len(text) + len(written) + len(end))
    raise TemplateRejected(f"cannot find assistant turn {i} in the chat template's render of the conversation")


def place_turns(messages: list[dict], render: ChatRenderer, join_turns: bool = False) -> Placed:
    """The examples to train on for one conversation (see the module docstring); TemplateRejected for a record
    the template refuses or whose turns cannot be located."""
    messages, text, notes = _render_record(messages, render, join_turns)
    if render.marks_generation:
        text, spans = render.generation_spans(messages)
        return Placed([(text, [tuple(s) for s in spans])], tuple(notes))
    layout = render.layout
    placed = layout.place(messages) if layout is not None else None
    if placed is not None and placed[0] == text:
        return Placed([(text, layout.assistant_spans(messages, placed[1], render.eos_token))], tuple(notes))
    spans, alone = [], []
    last = len(messages) - 1
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            prompt = render(messages[:i], True) if i else render.lone_prompt
            upto = text if i == last else render(messages[: i + 1])
        except Exception as error:  # a template that refuses a prefix it would render in full
            raise TemplateRejected(f"the chat template rejects the conversation up to turn {i}: {error}") from None
        found = None
        if upto.startswith(prompt):
            found = _content_and_end(upto, message["content"], len(prompt), render.eos_token)
        if found is not None and text.startswith(prompt):
            _, written, end = found
            at = text.find(written + end, len(prompt))
            if at >= 0:
                spans.append((at, at + len(written) + len(end)))
                continue
        alone.append(_turn_alone(messages, i, prompt, upto, render.eos_token))
    examples = ([(text, spans)] if spans else []) + [(t, [span]) for t, span in alone]
    if alone:
        notes.append(EXPANDED)
    return Placed(examples, tuple(notes))
