#!/usr/bin/env bash
# Install (if needed) and run the quickstart: embedded corpus + model, LoRA on 2 Ray Train workers, eval.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/instune run configs/quickstart.yaml "$@"
