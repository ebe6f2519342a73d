import math
from pathlib import Path

import pytest
import torch

from instune.eval.evaluate import (EvalSettings, EvalWorker, SetResult, evaluate_in_process, example_rows,
                                   reference_loss_sums, score_sets, split_prompt)

SETTINGS = EvalSettings(max_length=64, max_new_tokens=6, batch_size=4)


def test_split_prompt_takes_the_last_assistant_turn():
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    prompt, answer = split_prompt(messages)
    assert prompt == messages[:3] and answer == "d"


def test_example_rows_one_per_record_sorted_by_length(tiny_eval_sets):
    rows = example_rows(tiny_eval_sets)
    assert len(rows) == 5 + 2 + 3
    assert {(r["set"], r["index"]) for r in rows} == {(s.name, i) for s in tiny_eval_sets
                                                       for i in range(len(s.records))}
    assert [len(r["messages"]) for r in rows] == sorted(len(r["messages"]) for r in rows)


def test_reference_loss_sums_do_not_depend_on_padding(tiny_model_dir, tiny_eval_sets):
    worker = EvalWorker(str(tiny_model_dir), None, SETTINGS)
    conversations = [r["messages"] for r in tiny_eval_sets[0].records + tiny_eval_sets[2].records]
    with torch.no_grad():
        batched = reference_loss_sums(worker.model, worker.tokenizer, conversations, 64)
        alone = [reference_loss_sums(worker.model, worker.tokenizer, [c], 64)[0] for c in conversations]
    assert [c for _, c in batched] == [c for _, c in alone]
    assert all(c >= 2 for _, c in batched)  # the answer's tokens and the end-of-turn token
    assert [s for s, _ in batched] == pytest.approx([s for s, _ in alone], rel=1e-4)


def test_evaluate_in_process_scores_every_set(tiny_model_dir, tiny_eval_sets):
    results, predictions = evaluate_in_process(str(tiny_model_dir), tiny_eval_sets, SETTINGS)
    assert [(r.name, r.kind, r.examples) for r in results] == [("arith_a", "in_domain", 5),
                                                               ("arith_b", "in_domain", 2),
                                                               ("units", "out_of_domain", 3)]
    for r in results:
        # A random model over a 400-token vocabulary: loss near ln(400), no exact answers.
        assert 3 < r.loss < 10 and r.perplexity == pytest.approx(math.exp(r.loss))
        assert r.exact_match == 0.0 and 0 <= r.rouge_l <= 1 and 0 <= r.chrf <= 100
    assert len(predictions) == 10
    assert predictions[0]["set"] == "arith_a" and predictions[0]["reference"] == "5"
    # arith_b is the first two records of arith_a: same answers, greedy.
    by_key = {(p["set"], p["index"]): p["prediction"] for p in predictions}
    assert by_key[("arith_b", 1)] == by_key[("arith_a", 1)]


def test_greedy_is_deterministic_and_independent_of_batch_size(tiny_model_dir, tiny_eval_sets):
    first = evaluate_in_process(str(tiny_model_dir), tiny_eval_sets, SETTINGS)
    again = evaluate_in_process(str(tiny_model_dir), tiny_eval_sets, SETTINGS)
    assert first == again
    one_by_one = evaluate_in_process(str(tiny_model_dir), tiny_eval_sets,
                                     EvalSettings(max_length=64, max_new_tokens=6, batch_size=1))
    assert [p["prediction"] for p in one_by_one[1]] == [p["prediction"] for p in first[1]]
    assert [r.loss for r in one_by_one[0]] == pytest.approx([r.loss for r in first[0]], rel=1e-4)


def test_sampling_is_reproducible_by_seed(tiny_model_dir, tiny_eval_sets):
    def answers(seed):
        settings = EvalSettings(max_length=64, max_new_tokens=6, batch_size=4, do_sample=True, temperature=1.5,
                                top_p=1.0, seed=seed)
        return [p["prediction"] for p in evaluate_in_process(str(tiny_model_dir), tiny_eval_sets, settings)[1]]

    greedy = [p["prediction"] for p in evaluate_in_process(str(tiny_model_dir), tiny_eval_sets, SETTINGS)[1]]
    assert answers(3) == answers(3)
    assert answers(3) != answers(4)
    assert answers(3) != greedy


def test_score_sets_aggregates_loss_by_tokens(tiny_eval_sets):
    sets = tiny_eval_sets[2:]
    rows = [{"set": "units", "index": i, "loss_sum": float(s), "tokens": t, "prediction": p}
            for i, (s, t, p) in enumerate([(2.0, 2, "2000 m"), (9.0, 3, "30 cm"), (1.0, 5, "1000 g.")])]
    (result,), predictions = score_sets(sets, rows)
    assert result.loss == pytest.approx(12.0 / 10)
    assert result.exact_match == pytest.approx(2 / 3)
    assert [p["prediction"] for p in predictions] == ["2000 m", "30 cm", "1000 g."]
    with pytest.raises(AssertionError, match="2 answers for 3 examples"):
        score_sets(sets, rows[:2])


def test_set_result_round_trips_and_reads_older_files():
    r = SetResult("s", "d", "in_domain", 3, 1.0, math.e, 0.5, 0.4, 10.0, 20.0)
    assert SetResult.from_dict(r.to_dict()) == r
    old = SetResult.from_dict({"name": "s", "domain": "d", "kind": "in_domain", "examples": 3, "loss": 1.0,
                               "perplexity": math.e, "exact_match": 0.5})
    assert old.exact_match == 0.5 and math.isnan(old.rouge_l) and math.isnan(old.chrf)


def test_every_eval_setting_reaches_eval_settings_or_is_listed_as_used_elsewhere():
    import dataclasses

    from instune.config import EvalConfig, ModelConfig
    from instune.eval.evaluate import NOT_IN_EVAL_SETTINGS, eval_settings

    taken = {f.name for f in dataclasses.fields(EvalSettings)}
    lost = [f"eval.{key}" for key in EvalConfig.model_fields
            if key not in taken and f"eval.{key}" not in NOT_IN_EVAL_SETTINGS]
    assert lost == [], f"eval fields that reach no setting; add them to EvalSettings or NOT_IN_EVAL_SETTINGS: {lost}"
    assert all(path.split(".")[1] in EvalConfig.model_fields for path in NOT_IN_EVAL_SETTINGS)
    settings = eval_settings(ModelConfig(max_length=99, dtype="bfloat16"),
                             EvalConfig(max_new_tokens=7, batch_size=5, do_sample=True, temperature=0.5, top_p=0.9,
                                        seed=3))
    assert settings == EvalSettings(max_length=99, max_new_tokens=7, batch_size=5, dtype="bfloat16", do_sample=True,
                                    temperature=0.5, top_p=0.9, seed=3)


def test_the_base_model_is_evaluated_with_the_tokenizer_its_data_was_rendered_with(tiny_model_dir, tiny_eval_sets,
                                                                                  tmp_path):
    """A base model whose tokenizer has no chat template (or another one), given model.chat_template: the eval
    actors take the resolved tokenizer (base_model's), as the tuned model's export carries it."""
    import json
    import shutil

    from instune import stages
    from instune.config import validate_config

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    for name in ("chat_template.jinja", "chat_template.json"):
        (base / name).unlink(missing_ok=True)
    config_file = base / "tokenizer_config.json"
    config_file.write_text(json.dumps({k: v for k, v in json.loads(config_file.read_text()).items()
                                       if k != "chat_template"}))
    config = validate_config({"name": "t", "output_dir": str(tmp_path / "out"),
                              "model": {"path": str(base), "chat_template": "chatml"},
                              "data": {"sources": [{"name": "s", "path": "x.jsonl"}]}})
    tokenizer_dir = stages.base_eval_tokenizer(config, str(base))
    assert tokenizer_dir == str(tmp_path / "out" / "tokenizer")
    assert stages.base_eval_tokenizer(config, str(tiny_model_dir)) is None  # another (trained) model: its own

    sets = tiny_eval_sets[:1]
    with pytest.raises(ValueError, match="chat template"):
        evaluate_in_process(str(base), sets, SETTINGS)
    # The same weights with the templated tokenizer saved beside them: the same results.
    templated = tmp_path / "templated"
    shutil.copytree(base, templated)
    for path in Path(tokenizer_dir).iterdir():
        shutil.copy(path, templated / path.name)
    expected, _ = evaluate_in_process(str(templated), sets, SETTINGS)
    results, _ = evaluate_in_process(str(base), sets, SETTINGS, tokenizer_path=tokenizer_dir)
    assert math.isfinite(expected[0].loss)
    assert [r.to_dict() for r in results] == [r.to_dict() for r in expected]
