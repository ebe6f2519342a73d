"""Progress lines: "[stage] 120/400 examples, 3.2 examples/s, eta 1m27s", at most one every few seconds.

A line, not a redrawn bar: the same output reads well on a terminal, in a pipe, in a Ray job's log and in
OUTPUT_DIR/logs. The rate is over the work done since the first update, so start-up time (a model loading)
does not make the ETA look better or worse than the work ahead.
"""

from __future__ import annotations

import time


def duration(seconds: float) -> str:
    """75 -> "1m15s", 3700 -> "1h01m", 9 -> "9s"."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def rate_and_eta(done: int, total: int, since: tuple[float, int], now: float) -> tuple[float | None, str]:
    """(units per second since `since` = (time, units done then) or None before any progress, the ETA text)."""
    t0, done0 = since
    if done <= done0 or now <= t0:
        return None, "eta ?"
    rate = (done - done0) / (now - t0)
    return rate, f"eta {duration((total - done) / rate)}"


class Progress:
    """Prints `[stage] done/total unit, rate, eta` at most every `every_s` seconds, and a final line."""

    def __init__(self, stage: str, total: int, unit: str, every_s: float = 10.0):
        self.stage, self.total, self.unit, self.every_s = stage, total, unit, every_s
        self.started = time.monotonic()
        self.since: tuple[float, int] | None = None
        self.printed = self.started

    def update(self, done: int) -> None:
        now = time.monotonic()
        if self.since is None:
            # Rows come in blocks: the rate is measured over at least `every_s` from the first ones.
            self.since, self.printed = (now, done), now
            return
        if now - self.printed < self.every_s or done >= self.total:
            return
        self.printed = now
        rate, eta = rate_and_eta(done, self.total, self.since, now)
        speed = f"{rate:.1f} {self.unit}/s" if rate is not None else f"? {self.unit}/s"
        print(f"[{self.stage}] {done}/{self.total} {self.unit}, {speed}, {eta}", flush=True)

    def finished(self, what: str) -> str:
        """The final line: `what` (e.g. "base: 400 examples"), the time taken and the overall rate."""
        seconds = time.monotonic() - self.started
        return f"[{self.stage}] {what} in {duration(seconds)} ({self.total / max(seconds, 1e-9):.1f} {self.unit}/s)"
