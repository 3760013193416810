#!/usr/bin/env bash
# Builds .fa4/ in the repo root: FlashAttention-4 (PyPI flash-attn-4, CuTe DSL) and its CUDA 13 DSL libraries for the
# GPU machine's Python 3.12, packed to fit the device tool's 64 MiB carry limit (the DSL's 193 MB MLIR library
# compresses to ~54 MB with xz's x86 filter; the wheels alone are 100 MB). Usage, from the repo root:
#   bash bench/experiments/fa4/bundle.sh
# On the GPU machine (carry .fa4), before `longreach bench kernels` (which then adds the fa4 / fa4_s2 rows):
#   mkdir -p /tmp/fa4site && tar xJf .fa4/site.tar.xz -C /tmp/fa4site &&
#   export PYTHONPATH=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages:.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
grep -qx '/.fa4/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.fa4/' >> .git/info/exclude; }
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d "$tmp/w" \
  flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
  nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5 \
  "apache-tvm-ffi>=0.1.11,<0.2" torch-c-dlpack-ext
mkdir -p "$tmp/site"
for w in "$tmp"/w/*.whl; do python3 -m zipfile -e "$w" "$tmp/site"; done
rm -rf "$tmp/site/nvidia_cutlass_dsl/cu13/lib/stubs"  # aarch64 / QNX stubs
mkdir -p .fa4
tar cf - -C "$tmp/site" . | xz -T1 --x86 --lzma2=preset=9e,dict=256MiB > .fa4/site.tar.xz
rm -rf "$tmp"
ls -la .fa4
