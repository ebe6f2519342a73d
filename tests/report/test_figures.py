import math
import struct

import pytest

from instune.eval.evaluate import SetResult
from instune.report.figures import domain_bars_png, gap_png, hyperparameter_png, learning_curves_png


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def results(scale: float):
    return [SetResult(name, name, kind, 10, 2.0 / scale, math.exp(2.0 / scale), 0.2 * scale, 0.3 * scale,
                      10.0 * scale, 30.0 * scale)
            for name, kind in [("arith", "in_domain"), ("lists", "in_domain"), ("units", "out_of_domain")]]


def test_learning_curves_with_and_without_validation_loss():
    rows = [{"step": s, "loss": 3.0 / s, "lr": 1e-3 * s} for s in range(1, 11)]
    plain = learning_curves_png(rows)
    rows[4]["eval_loss"] = 1.0
    rows[9]["eval_loss"] = 0.5
    with_validation = learning_curves_png(rows)
    assert png_size(plain)[0] > 500 and png_size(with_validation)[0] > 500
    assert plain != with_validation
    with pytest.raises(AssertionError, match="no metrics"):
        learning_curves_png([])


def test_domain_bars_and_gap_before_and_after():
    before, after = results(1.0), results(2.0)
    for draw in (domain_bars_png, gap_png):
        single, paired = draw(before), draw(before, after)
        assert png_size(single)[0] > 800 and png_size(paired)[0] > 800
        assert single != paired


def test_domain_bars_tolerate_missing_metrics_and_sets():
    before = results(1.0)
    before[0].rouge_l = float("nan")
    assert png_size(domain_bars_png(before, results(2.0)[1:]))[0] > 800


def test_hyperparameter_plot_numeric_log_and_categorical():
    trials = [{"lr": 1e-5, "method": "lora", "score": 0.1}, {"lr": 1e-3, "method": "full", "score": 0.5},
              {"lr": 1e-4, "method": "lora", "score": float("nan")}]
    one = hyperparameter_png(trials, ["lr"], "score")
    two = hyperparameter_png(trials, ["lr", "method"], "score")
    assert png_size(two)[0] > png_size(one)[0] * 1.5
