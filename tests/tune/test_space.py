import numpy as np
import pytest
from ray import tune
from ray.tune.search.sample import Categorical, Float, Integer

from instune.config import SweepConfig, validate_config
from instune.errors import UserError
from instune.tune.space import (apply_overrides, check_param_paths, dirichlet_weights, mix_weights, param_overrides,
                                param_space, source_weight_overrides)


def base_tree(**sweep) -> dict:
    tree = {"name": "t", "output_dir": "out",
            "data": {"sources": [{"name": "a", "path": "a.jsonl"}, {"name": "b", "path": "b.jsonl"}]}}
    if sweep:
        tree["sweep"] = sweep
    return validate_config(tree).model_dump(mode="json")


def test_param_space_maps_each_range_to_its_tune_domain():
    sweep = SweepConfig(params={"train.lr": {"loguniform": [1e-4, 1e-2]}, "peft.r": {"choice": [8, 16]},
                                "peft.dropout": {"uniform": [0.0, 0.3]}, "train.max_steps": {"randint": [5, 7]}},
                        mix={"weights": {"a": 1.0, "b": {"choice": [0.0, 1.0]}}})
    space = param_space(sweep)
    assert list(space) == ["train.lr", "peft.r", "peft.dropout", "train.max_steps", "mix.a", "mix.b"]
    assert isinstance(space["train.lr"], Float) and space["train.lr"].lower == 1e-4
    assert isinstance(space["peft.r"], Categorical) and space["peft.r"].categories == [8, 16]
    assert isinstance(space["train.max_steps"], Integer)
    # Our randint bounds are inclusive: 7 must be drawable, 8 not.
    draws = {space["train.max_steps"].sample() for _ in range(300)}
    assert draws == {5, 6, 7}
    assert space["mix.a"] == 1.0


def test_grid_search_turns_choices_into_grid_axes():
    sweep = SweepConfig(search="grid", params={"peft.r": {"choice": [8, 16]}},
                        mix={"weights": {"a": {"choice": [0.0, 1.0]}, "b": 1.0}})
    space = param_space(sweep)
    assert space["peft.r"] == tune.grid_search([8, 16])
    assert space["mix.a"] == tune.grid_search([0.0, 1.0])


def test_grid_search_rejects_ranges_and_dirichlet():
    with pytest.raises(UserError, match="grid search needs a choice list.*train.lr"):
        base_tree(search="grid", params={"train.lr": {"uniform": [0.1, 0.2]}})
    with pytest.raises(UserError, match="cannot enumerate mix.dirichlet"):
        base_tree(search="grid", mix={"dirichlet": {"names": ["a", "b"]}})


def test_accuracy_objectives_need_fifo_and_the_final_eval():
    with pytest.raises(UserError, match="scheduler asha needs results while trials train"):
        base_tree(objective="out_of_domain_accuracy", params={"peft.r": {"choice": [8]}})
    with pytest.raises(UserError, match="needs final_eval: true"):
        base_tree(objective="out_of_domain_accuracy", scheduler="fifo", final_eval=False,
                  params={"peft.r": {"choice": [8]}})


def test_mix_weights_are_put_on_the_simplex():
    weights = mix_weights({"mix.a": 3.0, "mix.b": 1.0, "train.lr": 0.1}, ["a", "b"], None)
    assert weights == {"a": 0.75, "b": 0.25}
    with pytest.raises(UserError, match="every weight of this trial is 0"):
        mix_weights({"mix.a": 0.0, "mix.b": 0.0}, ["a", "b"], None)


def test_dirichlet_weights_follow_the_dirichlet_distribution():
    rng = np.random.default_rng(0)
    alpha, names = 0.5, ["a", "b", "c"]
    draws = np.array([[w for w in mix_weights({f"mix.{n}": u for n, u in zip(names, rng.uniform(size=3))},
                                              names, alpha).values()] for _ in range(4000)])
    assert np.allclose(draws.sum(axis=1), 1.0)
    # Dirichlet(0.5, 0.5, 0.5): each weight has mean 1/3 and variance (1/3)(2/3)/(1.5 + 1) = 0.0889.
    assert np.allclose(draws.mean(axis=0), 1 / 3, atol=0.02)
    assert np.allclose(draws.var(axis=0), (1 / 3) * (2 / 3) / 2.5, atol=0.01)
    # alpha = 1: the Gamma(1) quantile is the exponential one, -log(1 - u).
    assert dirichlet_weights({"a": 0.5}, 1.0)["a"] == pytest.approx(np.log(2))


def test_overrides_set_paths_in_a_copy_and_source_weights_by_index():
    tree = base_tree()
    overrides = param_overrides({"train.lr": 0.01, "peft.r": 4, "mix.a": 0.2})
    overrides.update(source_weight_overrides(tree, {"a": 0.2, "b": 0.8}))
    assert overrides == {"train.lr": 0.01, "peft.r": 4, "data.sources.0.weight": 0.2, "data.sources.1.weight": 0.8}
    changed = apply_overrides(tree, overrides)
    assert changed["train"]["lr"] == 0.01 and changed["peft"]["r"] == 4
    assert [s["weight"] for s in changed["data"]["sources"]] == [0.2, 0.8]
    assert tree["train"]["lr"] == 2e-4 and tree["data"]["sources"][0]["weight"] == 1.0


def test_a_bad_sampled_value_fails_validation_with_the_field_named():
    tree = apply_overrides(base_tree(), {"peft.dropout": 1.5})
    with pytest.raises(UserError, match="peft.dropout: Input should be less than 1"):
        validate_config(tree, "sweep trial config")


def test_param_paths_must_exist_and_be_free_to_vary():
    tree = base_tree()
    check_param_paths(tree, ["train.lr", "peft.r", "train.head_dropout", "data.mix_size", "scaling.num_workers"])
    with pytest.raises(UserError, match=r"sweep.params.train.lrr: no such config setting \(train.lrr"):
        check_param_paths(tree, ["train.lrr"])
    with pytest.raises(UserError, match="model.embedded is fixed for the whole sweep"):
        check_param_paths(tree, ["model.embedded.hidden_size"])
    with pytest.raises(UserError, match="weight sources or domains with sweep.mix"):
        check_param_paths(tree, ["data.sources.0.weight"])
