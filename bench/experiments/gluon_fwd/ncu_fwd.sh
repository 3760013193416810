#!/usr/bin/env bash
# Nsight Compute of the Gluon forward, dense and S2 at $S (default 32768): speed of light, warp states, and the
# per-SASS-instruction stall samples as CSV, into $OUT. bash bench/experiments/gluon_fwd/ncu_fwd.sh
set -u
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"
for s2 in 0 1; do
  rep=$OUT/ncu_fwd_s2${s2}
  S2=$s2 PYTHONPATH=. "$NCU" --clock-control none -k regex:_attn_fwd_sm90 -s 1 -c 1 \
    --section SpeedOfLight --section WarpStateStats --section SourceCounters --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis -o "$rep" -f python bench/experiments/gluon_fwd/ncu_fwd.py 2>&1 | tail -5
  "$NCU" -i "$rep.ncu-rep" --page details > "$rep.txt" 2>&1
  "$NCU" -i "$rep.ncu-rep" --page source --csv --print-source sass > "$rep.sass.csv" 2>&1
  ls -la "$rep"*
done
