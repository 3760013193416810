#!/usr/bin/env bash
# Installs longreach with its test extras into ./.venv (CPU, no CUDA downloads) and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TRITON_INTERPRET=1 DS_ACCELERATOR=cpu WANDB_MODE=${WANDB_MODE:-offline}
exec .venv/bin/python -m pytest -q -x --durations=15 "$@"
