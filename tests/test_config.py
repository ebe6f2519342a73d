"""Config loading: good files validate, bad ones fail at load time with one line naming the field."""

from pathlib import Path

import pytest
import yaml

from instune.config import VlmExperimentConfig, config_to_yaml, load_config, parse_override
from instune.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"name": "t", "output_dir": "out", "data": {"sources": [{"name": "a", "path": "a.jsonl"}]}}


def write(tmp_path, tree, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree) if not isinstance(tree, str) else tree)
    return path


def error_of(path, overrides=()):
    with pytest.raises(UserError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_every_shipped_config_validates():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        # vlm_*.yaml are multimodal experiments (instune/vlm_run.py), with their own schema.
        schema = VlmExperimentConfig if path.name.startswith("vlm_") else None
        assert load_config(path, schema=schema).name


def test_quickstart_interpolates_output_dir():
    config = load_config(ROOT / "configs/quickstart.yaml", ["output_dir=/tmp/elsewhere"])
    assert config.data.corpus.dir == "/tmp/elsewhere/corpus"
    assert all(s.path.startswith("/tmp/elsewhere/") for s in config.data.sources)
    assert all(s.path.startswith("/tmp/elsewhere/") for s in config.eval.sets)


def test_defaults_fill_in(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.peft.method == "lora" and config.scaling.num_workers == 2
    assert config.data.sources[0].format == "auto"


def test_unknown_key_names_its_path(tmp_path):
    tree = dict(MINIMAL, train={"lr": 1e-3, "learning_rate": 2})
    assert error_of(write(tmp_path, tree)).endswith("c.yaml: train.learning_rate: unknown key")


def test_wrong_type_and_value_name_the_field(tmp_path):
    message = error_of(write(tmp_path, dict(MINIMAL, train={"lr": "fast"})))
    assert "train.lr" in message and "'fast'" in message
    message = error_of(write(tmp_path, dict(MINIMAL, peft={"dropout": 1.5})))
    assert "peft.dropout" in message
    message = error_of(write(tmp_path, dict(MINIMAL, peft={"method": "magic"})))
    assert "peft.method" in message


def test_missing_required_field(tmp_path):
    tree = {"name": "t", "output_dir": "o"}
    assert "data: Field required" in error_of(write(tmp_path, tree))


def test_duplicate_source_names(tmp_path):
    tree = dict(MINIMAL, data={"sources": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]})
    assert "repeated: a" in error_of(write(tmp_path, tree))


def test_invalid_yaml_and_missing_file(tmp_path):
    assert "not valid YAML" in error_of(write(tmp_path, "name: [unclosed\n"))
    assert "config file not found" in error_of(tmp_path / "nope.yaml")
    assert "mapping" in error_of(write(tmp_path, "- a list\n"))


def test_overrides_set_nested_values_and_list_items(tmp_path):
    path = write(tmp_path, MINIMAL)
    config = load_config(path, ["train.lr=2e-4", "data.sources.0.weight=3", "peft.target_modules=[q_proj, v_proj]"])
    assert config.train.lr == pytest.approx(2e-4)
    assert config.data.sources[0].weight == 3
    assert config.peft.target_modules == ["q_proj", "v_proj"]


def test_bad_overrides(tmp_path):
    path = write(tmp_path, MINIMAL)
    assert "KEY=VALUE" in error_of(path, ["train.lr"])
    assert "not an index" in error_of(path, ["data.sources.5.weight=1"])
    assert "train.lr" in error_of(path, ["train.lr=-1"])


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a=1e-3") == ("a", 1e-3)
    assert parse_override("a=hello") == ("a", "hello")


def test_resolved_yaml_round_trips(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["train.lr=0.01"])
    again = load_config(write(tmp_path, config_to_yaml(config), "resolved.yaml"))
    assert again == config


def test_preference_settings_are_checked_at_load(tmp_path):
    path = write(tmp_path, MINIMAL)
    config = load_config(path, ["train.objective=simpo", "dpo.simpo_beta=2.5", "dpo.simpo_gamma_beta_ratio=0.4"])
    assert (config.train.objective, config.dpo.simpo_beta, config.dpo.simpo_gamma_beta_ratio) == ("simpo", 2.5, 0.4)
    # SimPO's defaults are its paper's, not DPO's β = 0.1.
    defaults = load_config(path, ["train.objective=simpo"]).dpo
    assert (defaults.beta, defaults.simpo_beta, defaults.simpo_gamma_beta_ratio) == (0.1, 2.0, 0.5)
    assert "train.objective" in error_of(path, ["train.objective=kto"])
    assert "dpo.label_smoothing" in error_of(path, ["dpo.label_smoothing=0.5"])
    # The adapter-less reference exists only for LoRA.
    error = error_of(path, ["train.objective=dpo", "dpo.reference=adapter_disabled", "peft.method=full"])
    assert "adapter_disabled needs peft.method: lora" in error
    assert load_config(path, ["train.objective=dpo", "dpo.reference=adapter_disabled"]).dpo.reference == \
        "adapter_disabled"


def test_data_settings_the_pair_pipeline_lacks_are_refused_for_a_preference_objective(tmp_path):
    path = write(tmp_path, MINIMAL)
    error = error_of(path, ["train.objective=orpo", "data.stream=true", "data.mix_size=100"])
    assert "data.stream, data.mix_size: not available for preference pairs (train.objective orpo)" in error
    assert load_config(path, ["data.stream=true", "train.max_steps=5"]).data.stream  # fine for sft
