"""Ray's own output into a log file; on the console, instune's lines only (unless -v).

Left alone, a quickstart prints about 400 lines, most of them Ray's: its driver-side loggers (Ray Data's
execution plan per dataset, Tune's and Train's status), and every line its workers print, forwarded to the
driver (Train's "Reporting training result", the placement-group cleaner's retries). Both go to
`<output dir>/logs/ray.log` instead. instune's own progress lines ("[train] step ...") that run inside Ray
workers (the Train controller, a sweep's trials) still reach the console: a forwarded line starting with
"[stage] " or "instune: " is printed as it is. `-v` keeps Ray's console output as well.

Ray's traceback-looking lines that are not failures land in the file too: "Failed to stop
PlacementGroupCleaner gracefully" with a GetTimeoutError, and "Monitor thread did not exit". Ray Train logs
them when its controller, at the end of a run, stops the cleaner (ray.get(cleaner.stop(), timeout)) while the
cleaner's monitor thread sits in a state-API call (GET_ACTOR_TIMEOUT_S = 10 s) longer than that timeout. The
controller then removes its placement group itself, as every graceful end does, and the cleaner exits once
its thread sees the stop flag: nothing leaks (checked in ray/train/v2/_internal/callbacks/
placement_group_callback.py and execution/controller/placement_group_cleaner.py, Ray 2.5x). Outside a sweep
the cleaner also logs "Failed to query Ray Train Controller actor state" every second: the state API lives in
the dashboard, which `instune train` and `run` do not start, and nothing needs the cleaner there, since a
private cluster ends with its driver. One line Ray's C++ core prints straight to the process's stderr stays
on the console ("core_worker.cc: Actor ... has constructor arguments in the object store and max_restarts >
0", for Ray Data's eval actor pool; ray-project/ray#53727): only redirecting file descriptor 2 would hide it.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from pathlib import Path

# The driver-side loggers Ray configures with console handlers (ray.data sets its own, not propagating).
RAY_LOGGERS = ("ray", "ray.data", "ray.tune", "ray.train")
# instune's lines printed inside Ray workers: progress ("[train] step 10/300 ...", "[sweep] trial ...") and
# notes ("instune: model.kernels: auto uses PyTorch's kernels ...", from the training loop's rank 0).
INSTUNE_LINE = re.compile(r"^(\[[a-z]+\] |instune: )")
LOG_NAME = "logs/ray.log"

_handler_name = "instune_ray_output"
_state: dict = {"removed": [], "file_handlers": [], "file": None}


def log_file_in(log_dir: Path | None) -> Path | None:
    return Path(log_dir) / LOG_NAME if log_dir is not None else None


def session_logs() -> str:
    """Where Ray writes its per-process logs for the connected cluster on this node."""
    import ray._private.worker

    return ray._private.worker._global_node.get_logs_dir_path()


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


def route_driver_logs(log_file: Path | None, verbose: bool) -> None:
    """Send the records of Ray's driver-side loggers to `log_file`, and, unless `verbose`, nowhere else
    (without a file they stay on the console). Called before ray.init, so its own start-up lines follow too."""
    import ray.data  # noqa: F401  (configures the ray.data logger, which the loop below then reroutes)

    file_handler = None
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        _state["file"] = open(log_file, "a", buffering=1)
        _state["file"].write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        if not verbose and file_handler is not None:
            for handler in [h for h in logger.handlers if _is_console(h)]:
                logger.removeHandler(handler)
                _state["removed"].append((logger, handler))
        if file_handler is not None and (name == "ray" or not logger.propagate):  # else "ray" writes it
            logger.addHandler(file_handler)
            _state["file_handlers"].append((logger, file_handler))


def route_worker_output(verbose: bool) -> None:
    """After ray.init(log_to_driver=True): write the lines Ray's workers print to the log file of
    route_driver_logs, and print instune's own lines among them; with `verbose` (or no file), Ray's forwarding
    to the console stays instead."""
    import ray.data
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    lock = threading.Lock()
    quiet = not verbose and _state["file"] is not None

    def handle(batch: dict) -> None:
        lines = batch.get("lines", [])
        log = _state["file"]
        if log is not None:
            who = " ".join(str(x) for x in (batch.get("actor_name") or batch.get("task_name"),
                                            f"pid={batch.get('pid')}") if x)
            with lock:
                log.writelines(f"({who}) {line}\n" for line in lines)
        if quiet:
            for line in lines:
                if INSTUNE_LINE.match(line):
                    print(line, flush=True)

    if quiet:
        global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
    # The dispatcher appends handlers: a second routing in one process (a notebook, a test session that started
    # Ray twice without restore) would otherwise print every forwarded line twice.
    global_worker_stdstream_dispatcher.remove_handler(_handler_name)
    global_worker_stdstream_dispatcher.add_handler(_handler_name, handle)
    context = ray.data.DataContext.get_current()
    # On a terminal, Ray Data's one bar per dataset shows rows, rate and ETA; a bar per operator is Ray's
    # detail (-v). Bars redrawn into a file or pipe are noise: instune's own progress lines remain.
    context.enable_progress_bars = sys.stderr.isatty()
    context.enable_operator_progress_bars = verbose


def restore() -> None:
    """Undo the routing (tests start and stop several clusters in one process)."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    global_worker_stdstream_dispatcher.remove_handler(_handler_name)
    for logger, handler in _state["removed"]:
        logger.addHandler(handler)
    for logger, handler in _state["file_handlers"]:
        logger.removeHandler(handler)
        handler.close()
    if _state["file"] is not None:
        _state["file"].close()
    _state.update(removed=[], file_handlers=[], file=None)
