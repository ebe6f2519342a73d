"""Ending a `ray start --head --block` that a test started, by pid: `ray stop` would stop every Ray cluster on
the machine, other test runs' included. Imported as `ray_heads` (tests/ is on sys.path through its conftest)."""

from __future__ import annotations

import contextlib
import subprocess

import psutil


def end_head(head: subprocess.Popen) -> None:
    """Kill the head's processes (all its descendants), then the head.

    `ray start --block` does not exit on SIGTERM in time: 30 s once a driver has connected, and with its
    processes ended first it still outlasted a 5 s grace every time (measured: exit status -9 after 5.03 s, the
    SIGKILL that followed). With its processes gone nothing is left for it to stop, so it is killed at once.
    """
    with contextlib.suppress(psutil.NoSuchProcess):  # the head may have died already
        for process in psutil.Process(head.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    head.kill()
    head.wait()
