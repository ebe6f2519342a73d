"""Tokenization: labels on assistant tokens only, every assistant turn, truncation and drops; the fast label
path against the reference rule. The real templates of each model family are tested in test_chat_template.py."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from instune.base_model import tokenizer_training_texts
from instune.data.chat_template import ChatRenderer, TemplateRejected, place_turns
from instune.data.tokenize import (IGNORE_INDEX, Tokenized, TokenizeError, encode_conversations, labels_from_spans,
                                   tokenize_batch, tokenizer_parts)
from instune.default.tokenizer import IM_END, IM_START, train_tokenizer

MULTI_TURN = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 7 + 5?"},
    {"role": "assistant", "content": "12"},
    {"role": "user", "content": "And 12 - 3?"},
    {"role": "assistant", "content": "9, since 12 - 3 = 9."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(tokenizer_training_texts(per_domain=30), vocab_size=400)


def labelled_text(tokenizer, t: Tokenized) -> str:
    return tokenizer.decode([i for i, label in zip(t.input_ids, t.labels) if label != IGNORE_INDEX])


def assistant_spans(messages, render) -> tuple[str, list]:
    """The render and spans of a conversation the template renders as one example."""
    [(text, spans)] = place_turns(messages, render).examples
    return text, spans


def test_every_assistant_turn_and_nothing_else_carries_labels(tokenizer):
    [t] = tokenize_batch([MULTI_TURN], tokenizer, max_length=512, truncation="drop")
    answers = [m["content"] for m in MULTI_TURN if m["role"] == "assistant"]
    # Labels are the answers with their end-of-turn token (so the model learns to stop), in order; not the
    # newline the template writes after it.
    assert labelled_text(tokenizer, t) == "".join(f"{a}{IM_END}" for a in answers)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(t.input_ids, t.labels))
    text = tokenizer.decode(t.input_ids)
    for prompt in ("Answer briefly.", "What is 7 + 5?", "And 12 - 3?", "Thanks!"):
        assert prompt in text and prompt not in labelled_text(tokenizer, t)
    assert t.labels[0] == IGNORE_INDEX


def test_labelled_runs_match_assistant_spans(tokenizer):
    [t] = tokenize_batch([MULTI_TURN], tokenizer, max_length=512, truncation="drop")
    runs, run = [], []
    for token, label in zip(t.input_ids, t.labels):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    runs += [tokenizer.decode(run)] if run else []
    text, spans = assistant_spans(MULTI_TURN, ChatRenderer(tokenizer))
    assert runs == [text[a:b] for a, b in spans]
    assert len(runs) == 3
    # Each run starts right after an assistant header.
    assert len(re.findall(re.escape(f"{IM_START}assistant\n"), text)) == 3


def test_truncation_cuts_and_drop_rejects(tokenizer):
    long = [{"role": "user", "content": "Repeat."}, {"role": "assistant", "content": "one two three " * 40}]
    [full] = tokenize_batch([long], tokenizer, max_length=10_000, truncation="drop")
    assert len(full.input_ids) > 40
    [cut] = tokenize_batch([long], tokenizer, max_length=40, truncation="truncate")
    assert len(cut.input_ids) == 40 and cut.input_ids == full.input_ids[:40] and cut.labels == full.labels[:40]
    [dropped] = tokenize_batch([long], tokenizer, max_length=40, truncation="drop")
    assert isinstance(dropped, TokenizeError)
    assert str(dropped) == f"{len(full.input_ids)} tokens is over max_length 40"


def test_no_assistant_token_left_after_truncation(tokenizer):
    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    results = tokenize_batch([long_prompt, short], tokenizer, max_length=32, truncation="truncate")
    assert isinstance(results[0], TokenizeError) and "no assistant tokens left" in str(results[0])
    # A failed record does not disturb its neighbours in the batch.
    assert isinstance(results[1], Tokenized) and labelled_text(tokenizer, results[1]) == f"ok{IM_END}"


SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
# Characters a byte-level BPE splits into several tokens, whitespace runs and a bare special-looking string.
AWKWARD = [
    [{"role": "user", "content": "Translate: 猫が好きです 🐈‍⬛"}, {"role": "assistant", "content": "I like cats 🐈‍⬛."}],
    [{"role": "system", "content": "  lead and trail  "}, {"role": "user", "content": "é\u0301?\n\n\n"},
     {"role": "assistant", "content": "\n\nnaïve café — “quoted” ½"}, {"role": "user", "content": "again"},
     {"role": "assistant", "content": "   "}],
    [{"role": "user", "content": "Say <|im_end|> literally"}, {"role": "assistant", "content": "ok 👍🏽👍🏽"}],
]


def real_conversations() -> list[list[dict]]:
    """ShareGPT conversations and MT-Bench prompts (with made-up answers) from ../shared/data, when present."""
    from instune.data.formats import ROLE_ALIASES

    if not SHARED.is_dir():
        pytest.skip(f"real test data {SHARED} is missing (see /work/shared/data/README.md)")
    conversations = []
    for record in json.loads((SHARED / "sharegpt_dummy_conversation.json").read_text()):
        turns = [{"role": ROLE_ALIASES[t["from"]], "content": t["value"]} for t in record["conversations"]]
        if turns and turns[-1]["role"] == "assistant":
            conversations.append(turns)
    for line in (SHARED / "mt_bench_questions.jsonl").read_text().splitlines():
        turns = []
        for k, question in enumerate(json.loads(line)["turns"]):
            turns += [{"role": "user", "content": question}, {"role": "assistant", "content": f"Answer {k}: ok."}]
        conversations.append(turns)
    return conversations


def test_fast_labels_equal_the_reference_rule_on_real_and_awkward_text(tokenizer):
    """The char-map shortcut labels exactly the tokens the offsets rule does, renders included."""
    conversations = real_conversations() + AWKWARD
    assert len(conversations) > 80
    render = ChatRenderer(tokenizer)
    assert render._direct is not None  # the embedded template takes the direct path
    fast = encode_conversations(conversations, tokenizer, 100_000, "drop")
    for messages, result in zip(conversations, fast):
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        assert render(messages) == text
        assert render(messages[:-1], True) == tokenizer.apply_chat_template(messages[:-1], tokenize=False,
                                                                            add_generation_prompt=True)
        reference = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        _, spans = assistant_spans(messages, render)
        expected = labels_from_spans(reference["offset_mapping"], reference["input_ids"], spans)
        [(ids, labels)] = result.examples
        assert ids.tolist() == reference["input_ids"]
        assert labels.tolist() == expected


def test_a_slow_path_renderer_gives_the_same_tokens(tokenizer):
    render = ChatRenderer(tokenizer)
    render._direct = None  # as for a template the direct path disagrees with
    [slow] = encode_conversations([MULTI_TURN], tokenizer, 512, "drop", render=render)
    [fast] = encode_conversations([MULTI_TURN], tokenizer, 512, "drop")
    [(slow_ids, slow_labels)], [(fast_ids, fast_labels)] = slow.examples, fast.examples
    assert slow_ids.tolist() == fast_ids.tolist() and slow_labels.tolist() == fast_labels.tolist()


def test_tokenizer_parts_tokenize_like_the_whole_tokenizer_without_importing_torch(tokenizer, tmp_path):
    """A worker builds its renderer and Rust tokenizer from the parts: same ids and labels, in a process
    where neither torch nor transformers' tokenizer classes are imported."""
    import pickle
    import subprocess
    import sys

    conversations = real_conversations() + AWKWARD + [MULTI_TURN]
    parts = tokenizer_parts(tokenizer)
    assert parts is not None
    assert parts.backend not in repr(parts)  # repr keys each worker's cache: the digest stands for the backend
    expected = encode_conversations(conversations, tokenizer, 100_000, "drop")
    (tmp_path / "in.pkl").write_bytes(pickle.dumps((parts, conversations)))
    script = (
        "import pickle, sys\n"
        "from instune.data.tokenize import encode_conversations\n"
        f"parts, conversations = pickle.loads(open({str(tmp_path / 'in.pkl')!r}, 'rb').read())\n"
        "render, backend = parts.build()\n"
        "out = encode_conversations(conversations, None, 100_000, 'drop', render, backend)\n"
        "assert 'torch' not in sys.modules and 'transformers.tokenization_utils_base' not in sys.modules\n"
        f"open({str(tmp_path / 'out.pkl')!r}, 'wb').write(pickle.dumps(out))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    got = pickle.loads((tmp_path / "out.pkl").read_bytes())
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.notes == b.notes and len(a.examples) == len(b.examples) == 1
        assert a.examples[0][0].tolist() == b.examples[0][0].tolist()
        assert a.examples[0][1].tolist() == b.examples[0][1].tolist()


def test_parts_loaded_with_torch_hidden_equal_the_parts_of_the_whole_tokenizer(tokenizer, tmp_path):
    """prepare loads the parts in a throwaway process that never imports torch: the same parts come out."""
    import pickle
    import subprocess
    import sys

    tokenizer.save_pretrained(tmp_path / "tok")
    script = (
        "import pickle, sys\n"
        "from instune.data.tokenize import load_tokenizer_parts\n"
        f"parts = load_tokenizer_parts({str(tmp_path / 'tok')!r}, hide_torch=True)\n"
        "assert 'transformers' in sys.modules and 'torch' not in sys.modules\n"
        f"open({str(tmp_path / 'parts.pkl')!r}, 'wb').write(pickle.dumps(parts))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    assert "PyTorch was not found" not in out.stderr + out.stdout
    hidden = pickle.loads((tmp_path / "parts.pkl").read_bytes())
    assert hidden is not None and hidden == tokenizer_parts(tokenizer)


def test_no_parts_for_a_template_the_direct_render_does_not_reproduce(tokenizer, monkeypatch):
    monkeypatch.setattr(ChatRenderer, "_slow", lambda self, messages, g: "something else")
    assert tokenizer_parts(tokenizer) is None


def test_fast_labels_equal_the_reference_rule_for_spans_anywhere(tokenizer):
    """Spans cut at arbitrary characters: tokens that straddle a span's start and several tokens of one
    multi-byte character at its end, which template-aligned spans rarely produce."""
    import random

    from instune.data.tokenize import span_labels

    rng = random.Random(0)
    backend = tokenizer.backend_tokenizer
    checked = 0
    for messages in AWKWARD + [MULTI_TURN]:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        encoding = backend.encode(text, add_special_tokens=False)
        ids = np.asarray(encoding.ids, dtype=np.int64)
        for _ in range(200):
            cuts = sorted(rng.sample(range(len(text) + 1), 4))
            spans = [(cuts[0], cuts[1]), (cuts[2], cuts[3])]
            expected = labels_from_spans(encoding.offsets, ids.tolist(), spans)
            assert span_labels(encoding, ids, spans).tolist() == expected, (text, spans)
            checked += 1
    assert checked == 800


def exact_spans(messages, render):
    """The examples from aligning each turn with prefix renders alone (the renderer's layout set aside)."""
    layout, render.layout = render.layout, None
    try:
        return place_turns(messages, render).examples
    finally:
        render.layout = layout


def test_one_render_spans_equal_the_prefix_render_spans(tokenizer):
    """The layout (one render per conversation) places every assistant turn where prefix renders do."""
    render = ChatRenderer(tokenizer)
    assert render.layout is not None  # ChatML has one
    for messages in real_conversations() + AWKWARD + [MULTI_TURN]:
        assert place_turns(messages, render).examples == exact_spans(messages, render)


# A template that adds a default system prompt when the conversation has none (as Qwen 2.5's does), and one
# that trims contents (as Llama 3's does): neither renders every message the same way everywhere.
DEFAULT_SYSTEM = ("{% if messages and messages[0]['role'] != 'system' %}<s>sys: Be helpful.</s>{% endif %}"
                  "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                  "{% if add_generation_prompt %}<s>assistant: {% endif %}")
TRIMMING = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] | trim }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant: {% endif %}")


@pytest.mark.parametrize("template", [DEFAULT_SYSTEM, TRIMMING])
def test_templates_without_one_layout_get_the_prefix_render_spans(template):
    render = ChatRenderer.direct(template, {})
    if template is DEFAULT_SYSTEM:
        assert render.layout is None  # the probes without a system message show the injected one
    else:
        assert render.layout is not None  # padded contents render otherwise: those conversations fall back
    conversations = AWKWARD + [MULTI_TURN, MULTI_TURN[1:], [{"role": "user", "content": "  padded  "},
                                                            {"role": "assistant", "content": " x "}]]
    for messages in conversations:
        try:
            expected = exact_spans(messages, render)
        except TemplateRejected:
            continue
        assert place_turns(messages, render).examples == expected
