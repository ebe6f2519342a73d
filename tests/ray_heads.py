"""Ending a `ray start --head --block` that a test started, by pid: `ray stop` would stop every Ray cluster on
the machine, other test runs' included. Imported as `ray_heads` (tests/ is on sys.path through its conftest)."""

from __future__ import annotations

import contextlib
import signal
import subprocess

import psutil


def end_head(head: subprocess.Popen, grace_s: float = 5) -> None:
    """Kill the head's processes (all its descendants), then the head: SIGTERM, and SIGKILL after `grace_s`.

    Once a driver has connected, `ray start --block` takes 30 s to exit on SIGTERM (measured, with or without
    its processes still running): ending its processes first lets it exit at once.
    """
    with contextlib.suppress(psutil.NoSuchProcess):  # the head may have died already
        for process in psutil.Process(head.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()
