#!/usr/bin/env bash
# Install what is needed, then run the whole pipeline on the embedded default config
# (a generated sample dataset, tiny random models, CPU, local Ray, no server, no network).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/talkforge run --config configs/default.yaml "$@"
