"""Chat-template tokenization with assistant-only labels.

Labels come from character spans, not from template-specific markers: for assistant turn i, the span runs
from the end of the prompt rendered for messages[:i] (with the generation prompt) to the end of the render
of messages[:i+1], so it holds the answer and the end-of-turn token. This works for any chat template whose
renders are prefix-stable (ChatML, Llama 3, Mistral, Qwen, ...), which we check rather than assume.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100


class TokenizeError(ValueError):
    """A record that cannot be tokenized as asked (too long to keep, or a template that is not prefix-stable)."""


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]


def assistant_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Return the rendered conversation and the (start, end) character spans of every assistant turn."""
    render = tokenizer.apply_chat_template
    text = render(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else _lone_prompt(render)
        upto = render(messages[: i + 1], tokenize=False)
        if not text.startswith(upto) or not upto.startswith(prompt):
            raise TokenizeError("the chat template does not render conversations prefix-stably; "
                                "cannot locate assistant turns")
        spans.append((len(prompt), len(upto)))
    return text, spans


def _lone_prompt(render) -> str:
    """The generation prompt before a first-turn answer (plain completions); "" if the template needs a turn."""
    try:
        return render([], tokenize=False, add_generation_prompt=True)
    except Exception:  # templates that index messages[0] raise all sorts of jinja errors on an empty list
        return ""


def labels_from_spans(offsets: list[tuple[int, int]], input_ids: list[int],
                      spans: list[tuple[int, int]]) -> list[int]:
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


def tokenize_batch(conversations: list[list[dict]], tokenizer, max_length: int,
                   truncation: str) -> list[Tokenized | TokenizeError]:
    """Tokenize many conversations in one tokenizer call; a failed record yields its TokenizeError in place."""
    texts, spans, results = [], [], []
    for messages in conversations:
        try:
            text, turn_spans = assistant_spans(messages, tokenizer)
        except TokenizeError as e:
            text, turn_spans = None, e
        texts.append(text)
        spans.append(turn_spans)
    ok = [i for i, t in enumerate(texts) if t is not None]
    encoded = tokenizer([texts[i] for i in ok], add_special_tokens=False, return_offsets_mapping=True)
    by_index = {i: (encoded["input_ids"][k], encoded["offset_mapping"][k]) for k, i in enumerate(ok)}
    for i in range(len(conversations)):
        if i not in by_index:
            results.append(spans[i])
            continue
        ids, offsets = by_index[i]
        labels = labels_from_spans(offsets, ids, spans[i])
        if len(ids) > max_length:
            if truncation == "drop":
                results.append(TokenizeError(f"{len(ids)} tokens is over max_length {max_length}"))
                continue
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            results.append(TokenizeError("no assistant tokens left to train on (after truncation)"))
            continue
        results.append(Tokenized(list(ids), labels))
    return results
