"""Ray job entrypoint for the prepare stage: read, filter, mix, tokenize and pack the data.

    python jobs/prepare.py CONFIG [--set KEY=VALUE ...]

`instune submit prepare CONFIG` runs this on the cluster; `ray job submit --working-dir . -- python jobs/prepare.py
CONFIG` does too. Inside a job, RAY_ADDRESS names the cluster and the stage joins it.
"""

import sys
from pathlib import Path

# Run as a script, Python puts jobs/ (not the project) on sys.path; a job's working dir is on PYTHONPATH,
# a checkout may not be.
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from instune.jobs import job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main("prepare", sys.argv[1:]))
