#!/usr/bin/env bash
# Nsight Compute of FlashAttention-4's sm_90 forward (dense causal 32K), as gluon_fwd/ncu_fwd.sh does for ours:
# details and per-SASS-instruction stall samples (CSV) into $OUT. Needs .fa4/site.tar.xz (bundle.sh) carried.
set -u
mkdir -p /tmp/fa4site && tar xJf .fa4/site.tar.xz -C /tmp/fa4site
export PYTHONPATH=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages:.
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
rep=$OUT/ncu_fa4_fwd
"$NCU" --clock-control none -k "regex:(?i)flash|fwd" -s 1 -c 1 --section SpeedOfLight --section WarpStateStats \
  --section SourceCounters --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis -o "$rep" -f \
  python bench/experiments/fa4/ncu_fa4.py 2>&1 | tail -5
"$NCU" -i "$rep.ncu-rep" --page details > "$rep.txt" 2>&1
"$NCU" -i "$rep.ncu-rep" --page source --csv --print-source sass > "$rep.sass.csv" 2>&1
ls -la "$rep"*
