"""Labels with the real chat templates of each model family (tests/data/chat_templates/, see its README).

Each template runs on the embedded byte-level tokenizer with the template's markers added as special tokens,
as they are in the family's own vocabulary. For every family, on multi-turn conversations with and without a
system turn, the labelled tokens must decode to exactly each assistant turn followed by its end-of-turn marker:
not the newline or the next header after it, not the header before it.
"""

import copy
import re
from pathlib import Path

import pytest

from instune.base_model import tokenizer_training_texts
from instune.data.chat_template import (EXPANDED, SYSTEM_JOINED, TURNS_JOINED, ChatRenderer, TemplateRejected,
                                        place_turns, read_template)
from instune.data.tokenize import IGNORE_INDEX, TokenizeError, encode_conversations, tokenizer_parts
from instune.default.tokenizer import train_tokenizer

TEMPLATES = Path(__file__).parent / "chat_templates"

# family -> (bos_token, eos_token, the end-of-turn text trained after each answer)
FAMILIES = {
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "llama3_1": ("<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "llama4": ("<|begin_of_text|>", "<|eot|>", "<|eot|>"),
    "qwen2_5": (None, "<|im_end|>", "<|im_end|>"),
    "qwen3": (None, "<|im_end|>", "<|im_end|>"),
    "qwen3_5": (None, "<|im_end|>", "<|im_end|>"),
    "chatml": (None, "<|im_end|>", "<|im_end|>"),
    "mistral_v1": ("<s>", "</s>", "</s>"),
    "mistral_v2v3": ("<s>", "</s>", "</s>"),
    "mistral_v3_tekken": ("<s>", "</s>", "</s>"),
    "mistral_v7_tekken": ("<s>", "</s>", "</s>"),
    "gemma2": ("<bos>", "<eos>", "<end_of_turn>"),
    "gemma3": ("<bos>", "<eos>", "<end_of_turn>"),
    "phi3": ("<s>", "<|endoftext|>", "<|end|>"),
    "phi3_5": ("<s>", "<|endoftext|>", "<|end|>"),
    "phi4": (None, "<|im_end|>", "<|im_end|>"),
    "phi4_reasoning": (None, "<|im_end|>", "<|im_end|>"),  # {% generation %} marks content + <|im_end|>
    "deepseek_v2": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "deepseek_v3": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "cohere": ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>"),
    "command_a": ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"),
}
# family -> the adjustments (without a system turn, with one) where a template needs any.
NOTES = {
    "gemma2": ((), (SYSTEM_JOINED,)),  # raises "System role not supported"
    "mistral_v2v3": ((), (EXPANDED,)),  # writes the system prompt into the last user turn only
    "mistral_v3_tekken": ((), (EXPANDED,)),
    # Its generation prompt opens a think block ("<think>\n") that earlier answers in the history lack.
    "qwen3_5": ((EXPANDED,), (EXPANDED,)),
}
MARKER = re.compile(r"<\|[A-Za-z_]+\|>|<｜[^｜]+｜>|\[/?[A-Z_]{3,}\]|</?[a-z_]{3,}>")

SYSTEM = {"role": "system", "content": "You are a terse assistant. Answer with numbers where you can."}
CONVERSATION = [
    {"role": "user", "content": "What is 17 + 25?"},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "Now list three primes below 10, comma separated."},
    {"role": "assistant", "content": "2, 3, 5\n\n(7 is one too.)"},
    {"role": "user", "content": "Thanks. Say bye."},
    {"role": "assistant", "content": "Bye!"},
]


@pytest.fixture(scope="module")
def base_tokenizer():
    return train_tokenizer(tokenizer_training_texts(per_domain=30), vocab_size=400)


def family_tokenizer(base, family: str):
    """The embedded tokenizer with the family's template, BOS / EOS and markers as special tokens."""
    bos, eos, _ = FAMILIES[family]
    template = (TEMPLATES / f"{family}.jinja").read_text(encoding="utf-8")
    tokenizer = copy.deepcopy(base)
    markers = sorted(set(MARKER.findall(template)) | {t for t in (bos, eos) if t})
    tokenizer.add_special_tokens({"additional_special_tokens": markers})
    tokenizer.bos_token, tokenizer.eos_token = bos, eos
    tokenizer.chat_template = template
    return tokenizer


def labelled_runs(tokenizer, ids, labels) -> list[str]:
    runs, run = [], []
    for token, label in zip(ids.tolist(), labels.tolist()):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return runs + ([tokenizer.decode(run)] if run else [])


def assert_trains_each_answer_once(tokenizer, encoded, messages, end_of_turn: str) -> None:
    """Every assistant turn is labelled exactly once, as its content then the end-of-turn text; a token that
    begins with the space before the content (" 4" after "[/INST]") may carry that space."""
    runs = [run for ids, labels in encoded.examples for run in labelled_runs(tokenizer, ids, labels)]
    expected = [m["content"] + end_of_turn for m in messages if m["role"] == "assistant"]
    assert len(runs) == len(expected), (runs, expected)
    for run in runs:
        matches = [e for e in expected if run.endswith(e) and not run[:-len(e)].strip()]
        assert matches, (run, expected)
        expected.remove(matches[0])


@pytest.mark.parametrize("with_system", [False, True], ids=["no-system", "system"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_labels_are_each_answer_and_its_end_of_turn(base_tokenizer, family, with_system):
    tokenizer = family_tokenizer(base_tokenizer, family)
    messages = ([SYSTEM] if with_system else []) + CONVERSATION
    [encoded] = encode_conversations([messages], tokenizer, 100_000, "drop")
    assert not isinstance(encoded, TokenizeError), encoded
    assert encoded.notes == NOTES.get(family, ((), ()))[with_system]
    assert_trains_each_answer_once(tokenizer, encoded, messages, FAMILIES[family][2])
    # Ray workers render with the compiled template and the Rust tokenizer alone (TokenizerParts): the same.
    parts = tokenizer_parts(tokenizer)
    assert parts is not None  # also for a template that refuses the probe's system turn (Gemma 2)
    [in_worker] = encode_conversations([messages], None, 100_000, "drop", *parts.build())
    assert in_worker.notes == encoded.notes and len(in_worker.examples) == len(encoded.examples)
    for (ids, labels), (worker_ids, worker_labels) in zip(encoded.examples, in_worker.examples):
        assert ids.tolist() == worker_ids.tolist() and labels.tolist() == worker_labels.tolist()
    if not encoded.notes:
        # One example, the conversation exactly as transformers renders it with this template.
        [(ids, _)] = encoded.examples
        assert tokenizer.decode(ids.tolist()) == tokenizer.apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize("family", ["mistral_v2v3", "mistral_v3_tekken"])
def test_an_expanded_turn_is_trained_after_the_prompt_the_model_sees(base_tokenizer, family):
    """Mistral v3 writes the system prompt into the last user turn only: each answer is trained after the
    generation prompt of its own prefix, which holds the system prompt, as at inference."""
    tokenizer = family_tokenizer(base_tokenizer, family)
    messages = [SYSTEM] + CONVERSATION
    placed = place_turns(messages, ChatRenderer(tokenizer))
    assert placed.notes == (EXPANDED,) and len(placed.examples) == 3
    for k, (text, [(start, end)]) in enumerate(placed.examples):
        i = 2 * k + 2  # the index of answer k in messages
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        assert text.startswith(prompt) and SYSTEM["content"] in prompt
        assert text[len(prompt):start].strip() == "" and text[start:end] == messages[i]["content"] + "</s>"


def test_qwen3_reasoning_stripped_from_history_is_still_trained(base_tokenizer):
    """Qwen 3 drops an earlier turn's <think> block from the history: that turn becomes an example of its own,
    where the template renders its reasoning, and the reasoning is trained with the answer."""
    tokenizer = family_tokenizer(base_tokenizer, "qwen3")
    messages = [{"role": "user", "content": "2 + 2?"},
                {"role": "assistant", "content": "<think>two and two</think>4"},
                {"role": "user", "content": "3 + 3?"},
                {"role": "assistant", "content": "<think>three and three</think>6"}]
    [encoded] = encode_conversations([messages], tokenizer, 100_000, "drop")
    assert encoded.notes == (EXPANDED,)
    runs = sorted(run for ids, labels in encoded.examples for run in labelled_runs(tokenizer, ids, labels))
    assert runs == ["<think>\nthree and three\n</think>\n\n6<|im_end|>",
                    "<think>\ntwo and two\n</think>\n\n4<|im_end|>"]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert "two and two" not in full  # what the one-render approach would have lost


DOUBLE_USER = [{"role": "user", "content": "Here is my question."}, {"role": "user", "content": "What is 6 x 7?"},
               {"role": "assistant", "content": "42"}]


@pytest.mark.parametrize("family, message", [
    ("gemma3", "Conversation roles must alternate user/assistant/user/assistant/..."),
    ("mistral_v1", "After the optional system message, conversation roles must alternate"),
    ("cohere", "Conversation roles must alternate user/assistant/user/assistant/..."),
])
def test_a_template_that_raises_rejects_the_record_or_joins_turns_when_asked(base_tokenizer, family, message):
    tokenizer = family_tokenizer(base_tokenizer, family)
    ok = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    rejected, kept = encode_conversations([DOUBLE_USER, ok], tokenizer, 100_000, "drop")
    assert isinstance(rejected, TokenizeError)
    assert str(rejected).startswith(f"the chat template rejects this record: {message}")
    assert kept.notes == () and len(kept.examples) == 1  # its neighbour in the batch is unaffected
    [joined] = encode_conversations([DOUBLE_USER], tokenizer, 100_000, "drop", join_turns=True)
    assert joined.notes == (TURNS_JOINED,)
    [(ids, _)] = joined.examples
    assert "Here is my question.\n\nWhat is 6 x 7?" in tokenizer.decode(ids.tolist())
    assert_trains_each_answer_once(tokenizer, joined, DOUBLE_USER, FAMILIES[family][2])


def test_gemma_system_text_joins_the_first_user_turn(base_tokenizer):
    tokenizer = family_tokenizer(base_tokenizer, "gemma2")
    with pytest.raises(Exception, match="System role not supported"):
        tokenizer.apply_chat_template([SYSTEM] + CONVERSATION, tokenize=False)
    [(text, _)] = place_turns([SYSTEM] + CONVERSATION, ChatRenderer(tokenizer)).examples
    assert f"<start_of_turn>user\n{SYSTEM['content']}\n\n{CONVERSATION[0]['content']}<end_of_turn>" in text


def test_generation_markers_decide_the_labels(base_tokenizer):
    """A template with {% generation %} blocks is taken at its word, even where it leaves out the end of turn."""
    content_only = read_template("chatml").replace(
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
        "{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}{% generation %}"
        "{{ message['content'] }}{% endgeneration %}{{'<|im_end|>\n'}}{% else %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}")
    assert content_only != read_template("chatml")
    tokenizer = family_tokenizer(base_tokenizer, "chatml")
    tokenizer.chat_template = content_only
    render = ChatRenderer(tokenizer)
    assert render.marks_generation and render.layout is None
    [encoded] = encode_conversations([CONVERSATION], tokenizer, 100_000, "drop", render=render)
    [(ids, labels)] = encoded.examples
    expected = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
    assert ids.tolist() == expected["input_ids"]
    assert [int(label != IGNORE_INDEX) for label in labels.tolist()] == expected["assistant_masks"]
    assert labelled_runs(tokenizer, ids, labels) == ["42", "2, 3, 5\n\n(7 is one too.)", "Bye!"]


def test_a_turn_the_template_cannot_place_rejects_only_its_record():
    """A template that renders an answer nowhere (it drops assistant messages) rejects the record."""
    render = ChatRenderer.direct("{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}"
                                 "{% endif %}{% endfor %}", {})
    with pytest.raises(TemplateRejected, match="assistant turn 1"):
        place_turns(CONVERSATION[:2], render)


def test_prepare_keeps_going_past_records_the_template_refuses(base_tokenizer, tmp_path, local_ray):
    """End to end with Mistral v3's template: records with two user turns in a row are dropped with the
    template's message, records with a system prompt are expanded, and every record is accounted for."""
    import contextlib
    import io
    import json

    from instune.config import validate_config
    from instune.data.prepare import prepare

    tokenizer = family_tokenizer(base_tokenizer, "mistral_v2v3")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    records = ([{"messages": [SYSTEM] + [dict(m, content=f"{m['content']} ({k})") for m in CONVERSATION]}
                for k in range(4)] +
               [{"messages": [dict(m, content=f"{m['content']} ({k})") for m in DOUBLE_USER]} for k in range(3)] +
               [{"messages": [dict(m, content=f"{m['content']} ({k})") for m in CONVERSATION[:2]]} for k in range(5)])
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = validate_config({"name": "t", "output_dir": str(tmp_path / "out"), "model": {"max_length": 512},
                              "data": {"sources": [{"name": "chat", "path": str(tmp_path / "chat.jsonl")}],
                                       "truncation": "drop"}})
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        manifest = prepare(config, str(tmp_path / "tokenizer"), tmp_path / "out" / "data")
    train = manifest["splits"]["train"]
    assert manifest["sources"]["chat"]["kept"] == 12 and train["drawn"] == {"chat": 12}
    [dropped] = train["dropped"]["chat"]
    assert dropped["count"] == 3 and dropped["example_reason"].startswith(
        "the chat template rejects this record: After the optional system message, conversation roles must alternate")
    # 4 records with a system prompt become 3 examples each; the 5 others stay one example each.
    assert train["adjusted"] == {"chat": [{"adjustment": EXPANDED, "records": 4, "extra_examples": 8}]}
    assert train["examples"] == 4 * 3 + 5
    assert "8 examples from expanded conversations" in printed.getvalue()
    report = (tmp_path / "out" / "data" / manifest["report"]).read_text()
    assert "## Adjusted for the chat template" in report and "Dropped at tokenization" in report


# ---------------------------------------------------------------- model.chat_template


def test_model_chat_template_takes_a_bundled_name_or_a_jinja_file(tmp_path):
    from instune.config import validate_config
    from instune.errors import UserError

    def config(template):
        return validate_config({"name": "t", "output_dir": str(tmp_path), "model": {"chat_template": template},
                                "data": {"sources": [{"name": "s", "path": "x.jsonl"}]}})

    assert config("llama3").model.chat_template == "llama3"
    (tmp_path / "mine.jinja").write_text(read_template("chatml"))
    assert config(str(tmp_path / "mine.jinja")).model.chat_template == str(tmp_path / "mine.jinja")
    with pytest.raises(UserError, match=r"model\.chat_template.*'llama9' is no bundled template \(one of: chatml"):
        config("llama9")
    with pytest.raises(UserError, match=r"model\.chat_template.*gone\.jinja is not a file"):
        config(str(tmp_path / "gone.jinja"))


def test_a_tokenizer_without_a_template_needs_model_chat_template(tmp_path):
    import json

    from transformers import AutoTokenizer

    from instune.base_model import resolve_base_model
    from instune.config import ModelConfig
    from instune.default.model import ensure_embedded_model
    from instune.errors import UserError

    model = ensure_embedded_model(tmp_path / "base", tokenizer_training_texts(per_domain=5), vocab_size=300,
                                  hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                                  max_position_embeddings=64, seed=0)
    for name in ("chat_template.jinja", "chat_template.json"):  # a base model's tokenizer: no template at all
        (model / name).unlink(missing_ok=True)
    config_file = model / "tokenizer_config.json"
    config_file.write_text(json.dumps({k: v for k, v in json.loads(config_file.read_text()).items()
                                       if k != "chat_template"}))
    with pytest.raises(UserError, match=r"^model\.chat_template: the tokenizer at .*base has no chat template"):
        resolve_base_model(ModelConfig(path=str(model)), tmp_path / "out")

    _, tokenizer_dir = resolve_base_model(ModelConfig(path=str(model), chat_template="llama3"), tmp_path / "out")
    assert tokenizer_dir == str((tmp_path / "out" / "tokenizer").resolve())
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer.chat_template == read_template("llama3")
    assert tokenizer("a b c")["input_ids"] == AutoTokenizer.from_pretrained(str(model))("a b c")["input_ids"]
    written = (tmp_path / "out" / "tokenizer" / ".instune_template").stat().st_mtime_ns
    resolve_base_model(ModelConfig(path=str(model), chat_template="llama3"), tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer" / ".instune_template").stat().st_mtime_ns == written  # not rewritten


# ---------------------------------------------------------------- Meta's own Llama 3 tokenizer

LLAMA3_TOKENIZER = "INSTUNE_LLAMA3_TOKENIZER"


def meta_llama3_tokenizer(tokenizer_model: str):
    """Meta's Llama 3 tokenizer (the tiktoken `tokenizer.model` that `pip download --no-deps llama-models`
    ships in llama_models/llama3/) as a transformers tokenizer: transformers' tiktoken converter, with the file
    read here (it is base64 token, rank per line) instead of through the tiktoken package, and Meta's special
    tokens in Meta's order (llama_models/llama3/tokenizer.py)."""
    import base64

    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    def ranks(path):
        pairs = (line.split() for line in Path(path).read_bytes().splitlines() if line)
        return {base64.b64decode(token): int(rank) for token, rank in pairs}

    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
               "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
               "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]
    special += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(special))]
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
    converter = TikTokenConverter(vocab_file=tokenizer_model, pattern=pattern, extra_special_tokens=special)
    converter.load_tiktoken_bpe = ranks
    return PreTrainedTokenizerFast(tokenizer_object=converter.converted(), bos_token="<|begin_of_text|>",
                                   eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>")


@pytest.mark.slow  # converting the 128k-token vocabulary takes 30-40 s
@pytest.mark.skipif(not Path(__import__("os").environ.get(LLAMA3_TOKENIZER, "/nonexistent")).is_file(),
                    reason=f"set {LLAMA3_TOKENIZER} to llama-models' llama_models/llama3/tokenizer.model")
def test_labels_with_meta_llama3_tokenizer_and_the_llama3_1_template():
    import os

    tokenizer = meta_llama3_tokenizer(os.environ[LLAMA3_TOKENIZER])
    assert tokenizer.convert_tokens_to_ids(["<|begin_of_text|>", "<|eot_id|>"]) == [128000, 128009]
    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [9906, 1917]
    tokenizer.chat_template = (TEMPLATES / "llama3_1.jinja").read_text(encoding="utf-8")
    for messages in (CONVERSATION, [SYSTEM] + CONVERSATION):
        [encoded] = encode_conversations([messages], tokenizer, 100_000, "drop")
        assert encoded.notes == ()
        assert_trains_each_answer_once(tokenizer, encoded, messages, "<|eot_id|>")
        [(ids, labels)] = encoded.examples
        assert tokenizer.decode(ids.tolist()) == tokenizer.apply_chat_template(messages, tokenize=False)
        # Each labelled run starts right after "<|end_header_id|>\n\n" and ends with <|eot_id|>.
        starts = [k for k in range(1, len(ids)) if labels[k] != IGNORE_INDEX and labels[k - 1] == IGNORE_INDEX]
        assert [tokenizer.decode(ids[k - 2:k].tolist()) for k in starts] == ["<|end_header_id|>\n\n"] * 3
