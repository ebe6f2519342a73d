"""`instune sweep CONFIG [FLAGS]` as the CLI runs it (on a private Ray cluster of its own, unless told to
join), then waits up to 60 s for every CPU of that cluster to be free and prints "free CPUs: X of Y"; exits
with the CLI's code. Run by tests/tune/test_sweep.py, which cannot see a cluster that lives in this process."""

import sys
import time

import ray

from instune import cli

code = cli.main(["sweep", *sys.argv[1:]])
deadline = time.monotonic() + 60
while time.monotonic() < deadline and ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
    time.sleep(1)
print(f"free CPUs: {ray.available_resources().get('CPU', 0):g} of {ray.cluster_resources()['CPU']:g}", flush=True)
sys.exit(code)
