"""`instune chat` over a JSONL of prompts on the embedded model (scaled down): the answers are eval's
generations for the same prompts, later turns see earlier answers, an adapter answers as its merged model
does, and bad prompt lines are one-line errors naming the file and line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from instune.cli import main
from instune.errors import UserError

QUESTIONS = ["What is 2 + 3?", "Reverse the list [1, 2, 3].", "Convert 2 km to m."]


def test_every_chat_setting_reaches_the_generation_settings():
    import dataclasses

    from instune.chat import NOT_IN_CHAT_SETTINGS, chat_settings
    from instune.config import ChatConfig, ModelConfig
    from instune.eval.evaluate import EvalSettings

    taken = {f.name for f in dataclasses.fields(EvalSettings)}
    lost = [f"chat.{key}" for key in ChatConfig.model_fields
            if key not in taken and f"chat.{key}" not in NOT_IN_CHAT_SETTINGS]
    assert lost == [], f"chat fields that reach no setting; add them to EvalSettings or NOT_IN_CHAT_SETTINGS: {lost}"
    settings = chat_settings(ModelConfig(max_length=99, dtype="bfloat16"),
                             ChatConfig(max_new_tokens=7, batch_size=5, do_sample=True, temperature=0.5, top_p=0.8,
                                        seed=3, system="Be brief."))
    assert settings == EvalSettings(max_length=99, max_new_tokens=7, batch_size=5, dtype="bfloat16", do_sample=True,
                                    temperature=0.5, top_p=0.8, seed=3)


@pytest.fixture(scope="module")
def embedded_model(tiny_model_dir) -> Path:
    """The embedded default model as `instune` builds it, with small dimensions: the session's (tests/conftest.py),
    which the data, eval and model-source tests have built before these run (its tokenizer's training is ~10 s
    on 2 cores)."""
    return Path(tiny_model_dir)


@pytest.fixture(scope="module")
def adapter_and_merged(embedded_model, tmp_path_factory) -> tuple[Path, Path]:
    """A LoRA adapter with non-zero weights on the embedded model (its tokenizer saved beside it), and the
    same adapter merged into a full model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("tuned")
    torch.manual_seed(1)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(embedded_model)),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    peft_model.save_pretrained(str(root / "adapter"))
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model))
    tokenizer.save_pretrained(str(root / "adapter"))
    peft_model.merge_and_unload().save_pretrained(str(root / "merged"), safe_serialization=True)
    tokenizer.save_pretrained(str(root / "merged"))
    return root / "adapter", root / "merged"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat_file(model: Path, prompts: Path, output: Path, *options: str) -> list[dict]:
    assert main(["chat", str(model), "--prompts", str(prompts), "--output", str(output),
                 "--set", "chat.max_new_tokens=6", *options]) == 0
    return [json.loads(line) for line in output.read_text().splitlines()]


def test_answers_are_evals_generations_and_later_turns_see_earlier_answers(embedded_model, tmp_path):
    from instune.eval.evaluate import EvalSet, EvalSettings, evaluate_in_process

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": QUESTIONS[0], "id": 7},
        {"instruction": "Reverse the list.", "input": "[1, 2, 3]"},
        {"messages": [{"role": "user", "content": QUESTIONS[2]}]},
        {"turns": [QUESTIONS[0], QUESTIONS[1]], "system": "Answer briefly."},
    ])
    out = chat_file(embedded_model, prompts, tmp_path / "answers.jsonl")

    assert len(out) == 4 and out[0]["id"] == 7  # every line back, in order, with its own fields
    assert [len(line["responses"]) for line in out] == [1, 1, 1, 2]
    # The same prompts through eval's generation, greedy, the same number of new tokens.
    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "-"}]}
               for q in (QUESTIONS[0], "Reverse the list.\n\n[1, 2, 3]", QUESTIONS[2])]
    _, predictions = evaluate_in_process(str(embedded_model), [EvalSet("s", "d", "in_domain", records)],
                                         EvalSettings(max_length=256, max_new_tokens=6, batch_size=8))
    assert [line["responses"][0] for line in out[:3]] == [p["prediction"].strip() for p in predictions]

    multi = out[3]["messages"]
    assert [m["role"] for m in multi] == ["system", "user", "assistant", "user", "assistant"]
    assert [multi[2]["content"], multi[4]["content"]] == out[3]["responses"]
    assert multi[1]["content"] == QUESTIONS[0] and multi[3]["content"] == QUESTIONS[1]
    assert multi[0] == {"role": "system", "content": "Answer briefly."}


def test_an_adapter_answers_as_its_merged_model_does(adapter_and_merged, embedded_model, tmp_path):
    adapter, merged = adapter_and_merged
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q in QUESTIONS])
    from_adapter = chat_file(adapter, prompts, tmp_path / "adapter.jsonl")
    from_merged = chat_file(merged, prompts, tmp_path / "merged.jsonl")
    from_base = chat_file(embedded_model, prompts, tmp_path / "base.jsonl")
    assert [r["responses"] for r in from_adapter] == [r["responses"] for r in from_merged]
    assert [r["responses"] for r in from_adapter] != [r["responses"] for r in from_base]


def test_bad_prompt_lines_and_settings_are_one_line_errors(embedded_model, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n")
    assert main(["chat", str(embedded_model), "--prompts", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"instune: error: --prompts: {bad} line 2: the last message is from assistant; end with a user turn"

    assert main(["chat", str(embedded_model), "--set", "train.lr=1"]) == 2
    assert "without --config only model.* and chat.* settings apply" in capsys.readouterr().err
    assert main(["chat", str(embedded_model), "--set", "chat.top_p=2"]) == 2
    assert capsys.readouterr().err.startswith("instune: error: --set: chat.top_p: Input should be less than")
    assert main(["chat", str(tmp_path / "missing"), "--prompts", str(bad)]) == 2
    assert "MODEL:" in capsys.readouterr().err

    # A base model whose tokenizer has no chat template: refused before any prompt is read.
    untemplated = tmp_path / "untemplated"
    shutil.copytree(embedded_model, untemplated)
    (untemplated / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = json.loads((untemplated / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (untemplated / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hi"}])
    assert main(["chat", str(untemplated), "--prompts", str(prompts)]) == 2
    assert f"instune: error: MODEL: the tokenizer of {untemplated} has no chat template" in capsys.readouterr().err
    # model.chat_template (--set, or the config's) gives it one, as it did the training data.
    answered = tmp_path / "answered.jsonl"
    assert main(["chat", str(untemplated), "--prompts", str(prompts), "--output", str(answered),
                 "--set", "model.chat_template=chatml", "--set", "chat.max_new_tokens=2"]) == 0
    assert len(json.loads(answered.read_text())["responses"]) == 1


def test_interactive_chat_keeps_the_conversation_until_reset(embedded_model):
    from instune.chat import interact
    from instune.eval.evaluate import EvalSettings
    from instune.eval.load import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(embedded_model), None, "float32", "cpu")
    settings = EvalSettings(max_length=256, max_new_tokens=4, batch_size=1)
    typed = iter([QUESTIONS[0], QUESTIONS[1], "/reset", QUESTIONS[0], "/exit", "never read"])
    shown = []
    assert interact(model, tokenizer, settings, None, read=lambda _: next(typed), write=shown.append) == 3
    answers = [line.removeprefix("model> ") for line in shown if line.startswith("model> ")]
    assert len(answers) == 3
    # After /reset the same first question gets the same (greedy) answer as at the start.
    assert answers[2] == answers[0]
    assert next(typed) == "never read"


def test_a_prompt_line_whose_input_is_not_text_is_a_one_line_error():
    from instune.chat import conversation_from

    assert conversation_from({"instruction": "Add.", "input": ""}, "p line 1", None).pending == ["Add."]
    with pytest.raises(UserError, match=r"^p line 2: input: expected text, got \[1, 2\]$"):
        conversation_from({"instruction": "Add.", "input": [1, 2]}, "p line 2", None)


def test_a_config_trained_with_outcome_markers_puts_the_success_marker_in_every_prompt(embedded_model, tmp_path,
                                                                                        capsys):
    """As eval does (eval.outcome_marker): chat with the config of a NAT run answers what the model is asked
    with the success marker, here a system message, and `eval.outcome_marker=none` asks without it."""
    import yaml

    success = "The following response succeeds."
    source = write_jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                                  {"role": "assistant", "content": "a"}]}])
    config = tmp_path / "nat.yaml"
    config.write_text(yaml.safe_dump({"name": "nat", "output_dir": str(tmp_path / "out"),
                                      "data": {"sources": [{"name": "s", "path": str(source)}],
                                               "outcome_markers": {"position": "system", "success": success}}}))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q in QUESTIONS] + [{"turns": QUESTIONS[:2]}])
    marked = chat_file(embedded_model, prompts, tmp_path / "marked.jsonl", "--config", str(config))
    assert f'[chat] Eval prompts carry the success marker "{success}" (system)' in capsys.readouterr().err
    # The same prompts with the marker written in as their system message: the same answers, every turn.
    explicit = write_jsonl(tmp_path / "explicit.jsonl", [{"prompt": q, "system": success} for q in QUESTIONS]
                           + [{"turns": QUESTIONS[:2], "system": success}])
    asked_with_marker = chat_file(embedded_model, explicit, tmp_path / "explicit_out.jsonl")
    assert [r["responses"] for r in marked] == [r["responses"] for r in asked_with_marker]
    assert [len(r["responses"]) for r in marked] == [1, 1, 1, 2]
    # The conversations written back are the user's: the marker is in the prompt only.
    assert all(m["content"] != success for r in marked for m in r["messages"])
    # Without the marker (eval.outcome_marker: none, or no config) the model is asked something else.
    unmarked = chat_file(embedded_model, prompts, tmp_path / "unmarked.jsonl", "--config", str(config),
                         "--set", "eval.outcome_marker=none")
    plain = chat_file(embedded_model, prompts, tmp_path / "plain.jsonl")
    assert [r["responses"] for r in unmarked] == [r["responses"] for r in plain]
    assert [r["responses"] for r in unmarked] != [r["responses"] for r in marked]
    assert "success marker" not in capsys.readouterr().err
    # Without a config, a model directory that export marked as trained with markers is asked with the marker.
    from instune.data.outcome import write_markers_file

    recorded = Path(shutil.copytree(embedded_model, tmp_path / "nat_model"))
    write_markers_file(recorded, {"field": "outcome", "success": success, "failure": "F.", "position": "system"})
    assert [r["responses"] for r in chat_file(recorded, prompts, tmp_path / "recorded.jsonl")] == \
        [r["responses"] for r in marked]
    assert f'success marker "{success}"' in capsys.readouterr().err
