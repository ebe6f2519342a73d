#!/usr/bin/env bash
# SFT then DPO on the embedded model: the quickstart's LoRA SFT, then configs/dpo_quickstart.yaml on its merged
# model. Extra arguments go to the DPO run (e.g. --set train.objective=ipo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=outputs/dpo_quickstart
[ -f "$out/sft/merged/config.json" ] || .venv/bin/instune run configs/quickstart.yaml --set output_dir=$out/sft
exec .venv/bin/instune run configs/dpo_quickstart.yaml "$@"
