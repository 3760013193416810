#!/usr/bin/env bash
# Installs longreach into ./.venv (CPU, no CUDA downloads) and runs the main job on the embedded default:
# evaluate SmolLM2-135M, extend its RoPE, train a few dozen steps, evaluate again, print before/after tables.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-$(.venv/bin/python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
exec .venv/bin/longreach demo "$@"
