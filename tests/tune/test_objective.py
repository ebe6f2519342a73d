import pytest

from instune.tune.objective import mode_of, scores, sets_needed, with_objective

KINDS = {"arith": "in_domain", "edit": "in_domain", "units": "out_of_domain"}


def test_loss_scores_average_by_kind_and_gap_is_ood_minus_in_domain():
    metrics = {"eval_loss/arith": 1.0, "eval_loss/edit": 2.0, "eval_loss/units": 4.5, "loss": 9.0}
    assert scores(metrics, KINDS, "loss") == {"in_domain_loss": 1.5, "out_of_domain_loss": 4.5,
                                              "generalisation_loss": pytest.approx(7.5 / 3), "gap_loss": 3.0}


def test_accuracy_gap_is_in_domain_minus_ood():
    metrics = {"accuracy/arith": 0.5, "accuracy/edit": 0.7, "accuracy/units": 0.2}
    got = scores(metrics, KINDS, "accuracy")
    assert got["in_domain_accuracy"] == pytest.approx(0.6)
    assert got["gap_accuracy"] == pytest.approx(0.4)


def test_scores_without_their_sets_are_left_out():
    assert scores({"eval_loss/arith": 1.0}, KINDS, "loss") == {"in_domain_loss": 1.0, "generalisation_loss": 1.0}
    assert scores({}, KINDS, "accuracy") == {}


def test_objective_is_set_only_once_it_can_be_computed():
    reported = with_objective({"eval_loss/arith": 1.0, "eval_loss/units": 3.0}, KINDS, "out_of_domain_accuracy")
    assert "objective" not in reported and reported["gap_loss"] == 2.0
    final = with_objective({"accuracy/units": 0.25}, KINDS, "out_of_domain_accuracy")
    assert final["objective"] == 0.25


def test_modes_and_needed_sets():
    assert [mode_of(o) for o in ("in_domain_loss", "gap_loss", "generalisation_accuracy", "gap_accuracy")] == \
        ["min", "min", "max", "min"]
    assert sets_needed("gap_accuracy") == ("in_domain", "out_of_domain")
    assert sets_needed("out_of_domain_loss") == ("out_of_domain",)
    assert sets_needed("generalisation_loss") == ()
