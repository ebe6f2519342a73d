"""Progress lines: durations, rate and ETA over the work since the first update, at most one line per interval."""

from instune import progress
from instune.progress import Progress, duration, rate_and_eta


def test_durations_read_as_a_person_writes_them():
    assert [duration(s) for s in (0, 9.4, 59.6, 75, 3599, 3700, 90000)] == \
        ["0s", "9s", "1m00s", "1m15s", "59m59s", "1h01m", "25h00m"]


def test_rate_and_eta_count_from_the_first_update():
    assert rate_and_eta(10, 100, (100.0, 10), 100.0) == (None, "eta ?")
    # 20 units in 10 s since the first update (start-up before it does not count): 2/s, 70 left -> 35 s.
    assert rate_and_eta(30, 100, (100.0, 10), 110.0) == (2.0, "eta 35s")


def test_lines_come_at_most_once_per_interval_with_rate_and_eta(monkeypatch, capsys):
    clock = iter([0.0, 5.0, 6.0, 14.0, 20.0, 21.0, 40.0, 41.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    p = Progress("eval", 100, "examples", every_s=10.0)  # t=0
    p.update(10)  # t=5: the first answers (a model loaded): rate counts from here
    p.update(12)  # t=6: the rest of their block: too soon for a line
    p.update(20)  # t=14: still under 10 s of answers
    p.update(40)  # t=20: 30 examples in 15 s
    p.update(45)  # t=21: too soon after the last line
    p.update(100)  # t=40: done; the final line says so
    assert capsys.readouterr().out == "[eval] 40/100 examples, 2.0 examples/s, eta 30s\n"
    assert p.finished("base: 100 examples") == "[eval] base: 100 examples in 41s (2.4 examples/s)"


def test_the_train_line_gives_the_eta_from_the_steps_since_the_first_report(tmp_path, capsys):
    import re

    from instune.train import trainer

    callback = trainer.make_metrics_callback(tmp_path / "metrics.jsonl", total_steps=30)
    for step in (5, 10):
        callback.after_report(None, [{"step": step, "loss": 2.0, "lr": 1e-3, "tokens_per_second": 500.0}], None)
    first, second = capsys.readouterr().out.splitlines()
    assert first == "[train] step 5/30 loss 2.0000 lr 1.00e-03 tok/s 500 eta ?"
    assert re.fullmatch(r"\[train\] step 10/30 loss 2\.0000 lr 1\.00e-03 tok/s 500 eta \d+s", second), second
