"""Starting a bench's own Ray cluster on a machine that may be busy (other benchmarks, test runs)."""

from __future__ import annotations


def init_local_ray(num_cpus: int, **init_kwargs) -> None:
    """ray.init a new local cluster of `num_cpus` (no dashboard, workers' output not on the console), tried up to
    three times: on a busy machine Ray's startup can time out, which it raises as a bare Exception."""
    import ray

    for attempt in range(3):
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, **init_kwargs)
            return
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            ray.shutdown()
