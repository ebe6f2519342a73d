"""Tokenization with assistant-only labels.

Which characters of a rendered conversation are trained on is the chat template's business (chat_template.py:
each assistant turn's content and its end-of-turn token; a record may become several examples). Here the
renders are tokenized and those character spans become labels.

A token is labelled when one of its characters lies inside a span: a token that starts in the template text
just before the content (SentencePiece's "▁4" after "[/INST]", byte-level BPE's " 4") is the token the model
has to produce, so it is a target. With a fast (Rust) tokenizer the first and last labelled token of each span
are found with `char_to_token`, a few calls per turn instead of a Python pass over every token's offsets;
`labels_from_spans` is that rule written out, used for slow tokenizers and as the reference the fast path is
tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from instune.data.chat_template import ChatRenderer, TemplateRejected, place_turns

from instune.data.truncate import IGNORE_INDEX, fit_tokens


class TokenizeError(ValueError):
    """A record that cannot be tokenized as asked (too long to keep, or a template that refuses it)."""


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]


@dataclass
class Encoded:
    """One record as training examples, each (input_ids, labels) int64 arrays, and the adjustments the chat
    template needed (chat_template.Placed.notes)."""

    examples: list[tuple[np.ndarray, np.ndarray]]
    notes: tuple[str, ...] = ()


# ---------------------------------------------------------------- labels


def labels_from_spans(offsets: list[tuple[int, int]], input_ids: list[int],
                      spans: list[tuple[int, int]]) -> list[int]:
    """Label every (non-empty) token with a character inside a span; the reference rule."""
    labels = [IGNORE_INDEX] * len(input_ids)
    span_index = 0
    for t, (start, end) in enumerate(offsets):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index == len(spans):
            break
        if end > max(start, spans[span_index][0]):
            labels[t] = input_ids[t]
    # The first token is never a target: in a packed bin it would be "predicted" from the previous example.
    if labels:
        labels[0] = IGNORE_INDEX
    return labels


def _token_range(encoding, span: tuple[int, int]) -> tuple[int, int] | None:
    """[first, last) tokens with a character inside `span`, from the encoding's char map; None where it has a gap."""
    start, end = span
    n = len(encoding)
    first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
    if first is None or last is None:
        return None
    # Several tokens can cover the first or the last character (a byte-split character): all of them count.
    while first > 0 and encoding.token_to_chars(first - 1)[1] > start:
        first -= 1
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
                         render: ChatRenderer | None = None, backend=None, join_turns: bool = False
                         ) -> list[Encoded | TokenizeError]:
    """Each conversation's training examples (chat_template.place_turns), tokenized in one batch call; a record
    that fails yields its TokenizeError in place. `render` and `backend` may be built once by the caller and
    reused; `join_turns` joins consecutive same-role messages first."""
    render = render or ChatRenderer(tokenizer)
    backend = backend if backend is not None else rust_tokenizer(tokenizer)
    placed: list = []
    texts, spans, owners = [], [], []  # one entry per example; owners[k] is its conversation's index
    for i, messages in enumerate(conversations):
        try:
            record = place_turns(messages, render, join_turns)
        except TemplateRejected as e:
            placed.append(TokenizeError(str(e)))
            continue
        placed.append(record)
        for text, turn_spans in record.examples:
            texts.append(text)
            spans.append(turn_spans)
            owners.append(i)
    encoded: list[tuple[np.ndarray, np.ndarray]] = []
    if texts and backend is not None:
        for encoding, turn_spans in zip(backend.encode_batch(texts, add_special_tokens=False), spans):
            ids = np.asarray(encoding.ids, dtype=np.int64)
            encoded.append((ids, span_labels(encoding, ids, turn_spans)))
    elif texts:
        batch = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        for ids, offsets, turn_spans in zip(batch["input_ids"], batch["offset_mapping"], spans):
            encoded.append((np.asarray(ids, dtype=np.int64),
                            np.asarray(labels_from_spans(offsets, ids, turn_spans), dtype=np.int64)))
    examples: dict[int, list] = {}
    for owner, example in zip(owners, encoded):
        examples.setdefault(owner, []).append(fit(*example, max_length, truncation))
    results = []
    for i, record in enumerate(placed):
        if isinstance(record, TokenizeError):
            results.append(record)
            continue
        fitted = examples.get(i, [])
        failed = [e for e in fitted if isinstance(e, TokenizeError)]
        kept = [e for e in fitted if not isinstance(e, TokenizeError)]
        if not fitted:
            results.append(TokenizeError("no assistant turn to train on"))
        elif failed and (truncation == "drop" or not kept):
            results.append(failed[0])
        else:
            results.append(Encoded(kept, record.notes))
    return results


def fit(ids: np.ndarray, labels: np.ndarray, max_length: int, truncation: str
        ) -> tuple[np.ndarray, np.ndarray] | TokenizeError:
    """One example cut to `max_length` as `truncation` says (truncate.py), or the TokenizeError that drops it."""
    fitted = fit_tokens(ids, labels, max_length, truncation)
    return TokenizeError(fitted) if isinstance(fitted, str) else fitted


def tokenize_batch(conversations: list[list[dict]], tokenizer, max_length: int,
                   truncation: str) -> list[Tokenized | TokenizeError]:
    """Tokenize many conversations in one tokenizer call; a failed record yields its TokenizeError in place.

    One example per record, for scoring and evaluation: the first, which is the whole conversation unless the
    template rewrote every turn of it (chat_template.place_turns)."""
    return [r if isinstance(r, TokenizeError) else Tokenized(r.examples[0][0].tolist(), r.examples[0][1].tolist())
            for r in encode_conversations(conversations, tokenizer, max_length, truncation)]
