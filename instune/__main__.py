"""`python -m instune STAGE CONFIG [--set KEY=VALUE ...]`: the `instune` command, for where the console script is not
installed. A Ray job runs this (`instune submit`, cluster/kuberay/rayjob.yaml): its working directory, a copy
of the project, is on the path."""

import sys

from instune.cli import main

if __name__ == "__main__":
    sys.exit(main())
