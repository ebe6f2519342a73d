"""Ray job entrypoint for the sweep stage: a hyperparameter sweep with Ray Tune (instune.stages.sweep_stage).

    python jobs/sweep.py CONFIG [--set KEY=VALUE ...]

`instune submit sweep CONFIG` runs this on the cluster; `ray job submit --working-dir . -- python jobs/sweep.py
CONFIG` does too. Inside a job, RAY_ADDRESS names the cluster and the stage joins it.
"""

import sys
from pathlib import Path

# Run as a script, Python puts jobs/ (not the project) on sys.path; a job's working dir is on PYTHONPATH,
# a checkout may not be.
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from instune.jobs import job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main("sweep", sys.argv[1:]))
