"""Preference pairs as token ids: prompt + chosen and prompt + rejected, labels on the response only.

Each side is the prompt messages and its answer rendered with the chat template; its labels are the answer's
tokens and the end-of-turn text the template writes after it (what SFT trains on), so the summed log-prob
of a side is that of the answer given the prompt, as DPO defines it.

A pair with a side over `max_length` is fitted as `data.truncation` says (the SFT meanings, for two sides), and
a response is never cut to nothing:
  prompt_left  (default) the prompt is shortened from the left, by the same number of tokens on both sides so
               they keep seeing the same context, down to one token, keeping both responses whole; a pair whose
               longer response does not fit even so is dropped with the reason.
  truncate     the prompt is shortened the same way, then the responses' ends are cut (each keeps at least
               `max_length` - 1 tokens of it).
  drop         the pair is dropped.
Shortened prompts and cut responses are counted for the report (prompt_cut, response_cut).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from instune.data.preference_formats import pair_conversations
from instune.data.tokenize import IGNORE_INDEX, ChatRenderer, TokenizeError, rust_tokenizer, span_labels

SIDES = ("chosen", "rejected")


@dataclass
class TokenizedPair:
    chosen_input_ids: np.ndarray
    chosen_labels: np.ndarray
    rejected_input_ids: np.ndarray
    rejected_labels: np.ndarray
    prompt_tokens: int  # before any shortening (of the longer side's prompt)
    prompt_cut: int  # tokens cut from the left of both prompts
    response_cut: bool  # a response was cut at its end to fit


def answer_span(text: str, prompt_text: str, answer: str, eos_token: str | None) -> tuple[int, int] | None:
    """Characters of `text` to train on: the answer as the template wrote it after the prompt, and the end of
    its turn (the EOS token where the template writes one right after, else what follows less whitespace)."""
    if not text.startswith(prompt_text):
        return None
    for written in dict.fromkeys((answer, answer.strip(), answer.rstrip(), answer.lstrip())):
        at = text.find(written, len(prompt_text)) if written else -1
        if at >= 0:
            tail = text[at + len(written):]
            end = eos_token if eos_token and tail.lstrip(" ").startswith(eos_token) else tail.rstrip()
            end_at = text.find(end, at + len(written)) + len(end) if end else at + len(written)
            return at, end_at
    return None


def render_side(messages: list[dict], render: ChatRenderer, eos_token: str | None) -> tuple[str, tuple[int, int]]:
    """(rendered conversation, the answer's span); TokenizeError where the template will not give one."""
    try:
        prompt_text = render(messages[:-1], True)
        text = render(messages)
    except Exception as error:  # jinja's TemplateError from raise_exception, or a template's own bug
        raise TokenizeError(f"the chat template rejects this pair: {str(error).strip().splitlines()[0]}") from None
    span = answer_span(text, prompt_text, messages[-1]["content"], eos_token)
    if span is None:
        raise TokenizeError("the chat template renders the prompt differently before an answer; cannot locate "
                            "the response")
    return text, span


def fit_pair(sides: dict[str, tuple[np.ndarray, np.ndarray]], max_length: int, truncation: str
             ) -> TokenizedPair | TokenizeError:
    """Both sides within `max_length` tokens as `truncation` says (see above), or the TokenizeError that drops
    the pair."""
    prompt_lengths = {}
    for side, (ids, labels) in sides.items():
        labelled = np.flatnonzero(labels != IGNORE_INDEX)
        if not len(labelled):
            return TokenizeError(f"the {side} response has no tokens")
        prompt_lengths[side] = int(labelled[0])
    longest = max(len(ids) for ids, _ in sides.values())
    if longest > max_length and truncation == "drop":
        return TokenizeError(f"{longest} tokens (prompt and longer response) is over max_length {max_length}")
    cut = min(max(0, longest - max_length), min(prompt_lengths.values()) - 1)
    out, response_cut = {}, False
    for side, (ids, labels) in sides.items():
        ids, labels = ids[cut:], labels[cut:].copy()
        if len(ids) > max_length:
            if truncation != "truncate":  # prompt_left: the responses stay whole or the pair goes
                return TokenizeError(f"the {side} response has {len(ids) - prompt_lengths[side] + cut} tokens: "
                                     f"with a one-token prompt it is over max_length {max_length}")
            ids, labels, response_cut = ids[:max_length], labels[:max_length], True
        labels[0] = IGNORE_INDEX  # as in SFT: the first token is never a target
        out[side] = (ids, labels)
    return TokenizedPair(*out["chosen"], *out["rejected"], prompt_tokens=max(prompt_lengths.values()),
                         prompt_cut=cut, response_cut=response_cut)


def tokenize_pairs(pairs: list[dict], tokenizer, max_length: int, truncation: str,
                   render: ChatRenderer | None = None) -> list[TokenizedPair | TokenizeError]:
    """Each pair ({prompt, chosen, rejected}) tokenized, both sides in one batch call; a pair that fails yields
    its TokenizeError in place."""
    render = render or ChatRenderer(tokenizer)
    backend = rust_tokenizer(tokenizer)
    eos_token = tokenizer.eos_token if isinstance(tokenizer.eos_token, str) else None
    rendered: list = []
    for pair in pairs:
        try:
            rendered.append([render_side(messages, render, eos_token) for messages in pair_conversations(pair)])
        except TokenizeError as error:
            rendered.append(error)
    texts = [text for sides in rendered if not isinstance(sides, TokenizeError) for text, _ in sides]
    spans = [span for sides in rendered if not isinstance(sides, TokenizeError) for _, span in sides]
    encoded = []
    if backend is not None:
        for encoding, span in zip(backend.encode_batch(texts, add_special_tokens=False) if texts else [], spans):
            ids = np.asarray(encoding.ids, dtype=np.int64)
            encoded.append((ids, span_labels(encoding, ids, [span])))
    elif texts:
        from instune.data.tokenize import labels_from_spans

        batch = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        for ids, offsets, span in zip(batch["input_ids"], batch["offset_mapping"], spans):
            encoded.append((np.asarray(ids, dtype=np.int64),
                            np.asarray(labels_from_spans(offsets, ids, [span]), dtype=np.int64)))
    results, k = [], 0
    for sides in rendered:
        if isinstance(sides, TokenizeError):
            results.append(sides)
            continue
        results.append(fit_pair({"chosen": encoded[k], "rejected": encoded[k + 1]}, max_length, truncation))
        k += 2
    return results
