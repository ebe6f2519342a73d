import math

import pytest

from instune.eval.compare import FIGURES, METRICS, per_set_rows, summary, summary_change, summary_rows
from instune.eval.evaluate import SetResult


def result(name, domain, kind, exact_match, loss, examples=10):
    return SetResult(name, domain, kind, examples, loss, math.exp(loss), exact_match, exact_match / 2,
                     10 * exact_match, 20 * exact_match)


BEFORE = [result("a1", "arith", "in_domain", 0.2, 2.0), result("a2", "arith", "in_domain", 0.4, 4.0),
          result("lists", "lists", "in_domain", 0.9, 1.0), result("units", "units", "out_of_domain", 0.1, 5.0)]
AFTER = [result("a1", "arith", "in_domain", 0.6, 1.0), result("a2", "arith", "in_domain", 0.8, 1.0),
         result("lists", "lists", "in_domain", 1.0, 0.5), result("units", "units", "out_of_domain", 0.1, 6.0)]


def test_summary_means_over_domains_not_sets():
    s = summary(BEFORE)["exact_match"]
    # arith = mean(0.2, 0.4) = 0.3 weighs as one domain beside lists 0.9.
    assert s["in_domain"] == pytest.approx((0.3 + 0.9) / 2)
    assert s["out_of_domain"] == pytest.approx(0.1)
    assert s["generalisation"] == pytest.approx((0.3 + 0.9 + 0.1) / 3)
    assert s["gap"] == pytest.approx(0.6 - 0.1)
    assert summary(BEFORE)["loss"]["in_domain"] == pytest.approx((3.0 + 1.0) / 2)
    assert summary(BEFORE)["chrf"]["out_of_domain"] == pytest.approx(2.0)


def test_summary_without_out_of_domain_sets_has_nan_gap():
    s = summary(BEFORE[:3])["exact_match"]
    assert math.isnan(s["out_of_domain"]) and math.isnan(s["gap"])
    assert s["generalisation"] == pytest.approx(0.6)


def test_summary_change_is_after_minus_before():
    change = summary_change(BEFORE, AFTER)
    assert change["exact_match"]["in_domain"] == pytest.approx((0.7 + 1.0) / 2 - 0.6)
    assert change["exact_match"]["out_of_domain"] == pytest.approx(0.0)
    assert change["exact_match"]["gap"] == pytest.approx(((0.7 + 1.0) / 2 - 0.1) - 0.5)
    assert change["loss"]["out_of_domain"] == pytest.approx(1.0)


def test_per_set_rows_pair_before_and_after_by_name():
    columns, rows = per_set_rows(BEFORE, list(reversed(AFTER)))
    assert columns[:6] == ["set", "domain", "kind", "n", "exact match before", "exact match after"]
    assert [r[0] for r in rows] == ["a1", "a2", "lists", "units"]
    assert rows[0][4:6] == [0.2, 0.6]
    assert all(len(r) == len(columns) for r in rows)
    single_columns, single_rows = per_set_rows(BEFORE)
    assert "exact match" in single_columns and single_rows[1][4] == 0.4


def test_summary_rows_cover_every_metric_and_figure():
    columns, rows = summary_rows(BEFORE, AFTER)
    assert columns == ["metric", "figure", "before", "after", "change"]
    assert len(rows) == len(METRICS) * len(FIGURES)
    em_in = next(r for r in rows if r[0] == "exact match" and r[1] == "in-domain mean")
    assert em_in[2:] == pytest.approx([0.6, 0.85, 0.25])
    assert summary_rows(BEFORE)[0] == ["metric", "figure", "value"]
