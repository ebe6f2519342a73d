"""Ray job entrypoint for the eval stage: evaluate a model on the configured eval sets.

    python jobs/eval.py CONFIG [--set KEY=VALUE ...] [--model DIR]   (default: the run's merged model)

`instune submit eval CONFIG` runs this on the cluster; `ray job submit --working-dir . -- python jobs/eval.py
CONFIG` does too. Inside a job, RAY_ADDRESS names the cluster and the stage joins it.
"""

import sys
from pathlib import Path

# Run as a script, Python puts jobs/ (not the project) on sys.path; a job's working dir is on PYTHONPATH,
# a checkout may not be.
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from instune.jobs import job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main("eval", sys.argv[1:]))
