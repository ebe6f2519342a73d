"""Chat-template tokenization with assistant-only labels.

Labels come from character spans, not from template-specific markers: for assistant turn i, the span runs
from the end of the prompt rendered for messages[:i] (with the generation prompt) to the end of the render
of messages[:i+1], so it holds the answer and the end-of-turn token. This works for any chat template whose
renders are prefix-stable (ChatML, Llama 3, Mistral, Qwen, ...), which we check rather than assume.

A token is labelled when it starts inside a span. With a fast (Rust) tokenizer the first and last labelled
token of each span are found with `char_to_token`, a few calls per turn instead of a Python pass over every
token's offsets; `labels_from_spans` is that rule written out, used for slow tokenizers and as the reference
the fast path is tested against.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

IGNORE_INDEX = -100


class TokenizeError(ValueError):
    """A record that cannot be tokenized as asked (too long to keep, or a template that is not prefix-stable)."""


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]


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
        try:
            self.template = tokenizer.get_chat_template()
            self.variables = template_variables(tokenizer)
            self._direct = _direct_render(self.template, self.variables)
            if not all(self._direct(messages=_PROBE[:k], add_generation_prompt=g) == self._slow(_PROBE[:k], g)
                       for k in (2, 3, 5) for g in (False, True)):
                self._direct = None
        except Exception:  # any template or version quirk: the slow path is always right
            self._direct = None
        self.lone_prompt = self._lone_prompt()
        self.layout = learn_layout(self)

    @classmethod
    def direct(cls, template: str, variables: dict) -> "ChatRenderer":
        """A renderer that only calls the compiled template, for a template a `ChatRenderer(tokenizer)` has
        checked (see TokenizerParts): no tokenizer object, so no transformers import beyond the compiler."""
        render = cls.__new__(cls)
        render.tokenizer, render.template, render.variables = None, template, variables
        render._direct = _direct_render(template, variables)
        render.lone_prompt = render._lone_prompt()
        render.layout = learn_layout(render)
        return render

    def _slow(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def __call__(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if self._direct is not None:
            return self._direct(messages=messages, add_generation_prompt=add_generation_prompt)
        return self._slow(messages, add_generation_prompt)

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
    prediction, and the spans follow from the lengths. Otherwise `assistant_spans` renders two prefixes per
    assistant turn, most of the rendering cost. A layout is only used where it reproduced every prefix render
    of the probe conversations (`learn_layout`), and for a conversation only where it reproduces its render.
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


_LAYOUT_PROBES = (
    [("system", "\u27e6s0\u27e7"), ("user", "\u27e6u1\u27e7"), ("assistant", "\u27e6a2\u27e7"),
     ("user", "\u27e6u3\u27e7"), ("assistant", "\u27e6a4\u27e7")],
    [("user", "\u27e6u5\u27e7"), ("assistant", "\u27e6a6\u27e7"), ("user", "\u27e6u7\u27e7"),
     ("assistant", "\u27e6a8\u27e7")],
    [("assistant", "\u27e6a9\u27e7")],
)


def learn_layout(render: "ChatRenderer") -> TurnLayout | None:
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


def assistant_spans(messages: list[dict], tokenizer, render: ChatRenderer | None = None
                    ) -> tuple[str, list[tuple[int, int]]]:
    """Return the rendered conversation and the (start, end) character spans of every assistant turn.

    A span runs from the end of the prompt rendered for messages[:i] with the generation prompt to the end of
    the render of messages[:i+1]; the renderer's layout gives the same spans from one render (TurnLayout).
    """
    render = render or ChatRenderer(tokenizer)
    text = render(messages)
    layout = render.layout
    placed = layout.place(messages) if layout is not None else None
    if placed is not None and placed[0] == text:
        prompt, bounds = len(layout.generation_prompt), placed[1]
        return text, [(bounds[i] + prompt, bounds[i + 1]) for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans = []
    last = len(messages) - 1
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], True) if i else render.lone_prompt
        upto = text if i == last else render(messages[: i + 1])
        if not text.startswith(upto) or not upto.startswith(prompt):
            raise TokenizeError("the chat template does not render conversations prefix-stably; "
                                "cannot locate assistant turns")
        spans.append((len(prompt), len(upto)))
    return text, spans


# ---------------------------------------------------------------- labels


def labels_from_spans(offsets: list[tuple[int, int]], input_ids: list[int],
                      spans: list[tuple[int, int]]) -> list[int]:
    """Label every token that starts inside a span (and is not empty); the reference rule."""
    labels = [IGNORE_INDEX] * len(input_ids)
    span_index = 0
    for t, (start, end) in enumerate(offsets):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index == len(spans):
            break
        span_start, span_end = spans[span_index]
        if start >= span_start and end > start:
            labels[t] = input_ids[t]
    # The first token is never a target: in a packed bin it would be "predicted" from the previous example.
    if labels:
        labels[0] = IGNORE_INDEX
    return labels


def _token_range(encoding, span: tuple[int, int]) -> tuple[int, int] | None:
    """[first, last) tokens starting inside `span`, from the encoding's char map; None where it has a gap."""
    start, end = span
    n = len(encoding)
    first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
    if first is None or last is None:
        return None
    if encoding.token_to_chars(first)[0] < start:  # a token that straddles the span's start is not a target
        first += 1
    # Several tokens can cover the last character (a byte-split character): all of them start inside.
    while last + 1 < n and encoding.token_to_chars(last + 1)[0] < end:
        last += 1
    return first, last + 1


def span_labels(encoding, ids: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    for span in spans:
        if span[1] <= span[0]:
            continue
        bounds = _token_range(encoding, span)
        if bounds is None:  # a character no token covers: fall back to the offsets of every token
            return np.asarray(labels_from_spans(encoding.offsets, ids.tolist(), spans), dtype=np.int64)
        labels[bounds[0]:bounds[1]] = ids[bounds[0]:bounds[1]]
    if len(labels):
        labels[0] = IGNORE_INDEX
    return labels


@dataclass(frozen=True)
class TokenizerParts:
    """What rendering and tokenizing need from a fast tokenizer whose template renders directly.

    A Ray worker builds its tokenizer from these (`Tokenizer.from_str`, the compiled template) instead of
    `AutoTokenizer.from_pretrained`, which imports torch and most of transformers: 3-4 s of CPU and a few
    hundred MB in every worker. The backend is serialised as transformers configured it, so the ids are the
    same as the full tokenizer's.
    """

    backend: str = field(repr=False)  # the Rust tokenizer as JSON (megabytes for large vocabularies)
    backend_digest: str  # stands for the backend in repr, which keys each worker's cache of built steps
    template: str
    variables: dict
    pad_token_id: int

    def build(self) -> tuple[ChatRenderer, object]:
        """(renderer, Rust tokenizer)."""
        from tokenizers import Tokenizer

        return ChatRenderer.direct(self.template, self.variables), Tokenizer.from_str(self.backend)


def tokenizer_parts(tokenizer) -> TokenizerParts | None:
    """The parts of `tokenizer`, or None where workers need the whole tokenizer (a slow tokenizer, or a
    template the direct render does not reproduce)."""
    render, backend = ChatRenderer(tokenizer), rust_tokenizer(tokenizer)
    if backend is None or render._direct is None:
        return None
    import hashlib

    serialised = backend.to_str()
    digest = hashlib.blake2b(serialised.encode(), digest_size=16).hexdigest()
    return TokenizerParts(serialised, digest, render.template, render.variables, tokenizer.pad_token_id)


def load_tokenizer_parts(tokenizer_path: str, hide_torch: bool = False) -> TokenizerParts | None:
    """The TokenizerParts of the tokenizer at `tokenizer_path`.

    `hide_torch` is for a process that exits afterwards (prepare's loading task): transformers is told torch is
    absent, so loading the tokenizer does not import torch (2-4 s of CPU and some 250 MB; tokenizers do not
    use it), and it keeps believing so for the rest of the process. Ignored where either is imported already.
    """
    import os
    import sys

    hidden = hide_torch and "torch" not in sys.modules and "transformers" not in sys.modules
    if hidden:
        sys.modules["torch"] = None  # importlib.util.find_spec, which transformers asks, then reports no torch
        os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"  # its "PyTorch was not found" notice
    try:
        from transformers import AutoTokenizer

        from instune.model_source import local_model_dir

        return tokenizer_parts(AutoTokenizer.from_pretrained(local_model_dir(tokenizer_path)))
    finally:
        if hidden:
            del sys.modules["torch"]


def rust_tokenizer(tokenizer):
    """The Rust tokenizer behind a fast tokenizer, with truncation and padding off as transformers sets them
    for an un-truncated call; None for a slow tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    if backend.truncation is not None or backend.padding is not None:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    return backend


# ---------------------------------------------------------------- batches


def encode_conversations(conversations: list[list[dict]], tokenizer, max_length: int, truncation: str,
                         render: ChatRenderer | None = None, backend=None
                         ) -> list[tuple[np.ndarray, np.ndarray] | TokenizeError]:
    """(input_ids, labels) int64 arrays per conversation, tokenized in one batch call; a record that fails
    yields its TokenizeError in place. `render` and `backend` may be built once by the caller and reused."""
    render = render or ChatRenderer(tokenizer)
    backend = backend if backend is not None else rust_tokenizer(tokenizer)
    texts, spans = [], []
    for messages in conversations:
        try:
            text, turn_spans = assistant_spans(messages, tokenizer, render)
        except TokenizeError as e:
            text, turn_spans = None, e
        texts.append(text)
        spans.append(turn_spans)
    ok = [i for i, t in enumerate(texts) if t is not None]
    encoded: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if ok and backend is not None:
        for i, encoding in zip(ok, backend.encode_batch([texts[i] for i in ok], add_special_tokens=False)):
            ids = np.asarray(encoding.ids, dtype=np.int64)
            encoded[i] = ids, span_labels(encoding, ids, spans[i])
    elif ok:
        batch = tokenizer([texts[i] for i in ok], add_special_tokens=False, return_offsets_mapping=True)
        for k, i in enumerate(ok):
            ids = batch["input_ids"][k]
            encoded[i] = (np.asarray(ids, dtype=np.int64),
                          np.asarray(labels_from_spans(batch["offset_mapping"][k], ids, spans[i]), dtype=np.int64))
    results = []
    for i in range(len(conversations)):
        if i not in encoded:
            results.append(spans[i])
            continue
        ids, labels = encoded[i]
        if len(ids) > max_length:
            if truncation == "drop":
                results.append(TokenizeError(f"{len(ids)} tokens is over max_length {max_length}"))
                continue
            ids, labels = ids[:max_length], labels[:max_length]
        if not (labels != IGNORE_INDEX).any():
            results.append(TokenizeError("no assistant tokens left to train on (after truncation)"))
            continue
        results.append((ids, labels))
    return results


def tokenize_batch(conversations: list[list[dict]], tokenizer, max_length: int,
                   truncation: str) -> list[Tokenized | TokenizeError]:
    """Tokenize many conversations in one tokenizer call; a failed record yields its TokenizeError in place."""
    return [r if isinstance(r, TokenizeError) else Tokenized(r[0].tolist(), r[1].tolist())
            for r in encode_conversations(conversations, tokenizer, max_length, truncation)]
