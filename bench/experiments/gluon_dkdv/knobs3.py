"""Fused-dq backward, two more knobs of ``gluon_sm90_bwd`` (2026-12-03, after FlashAttention-4's sm_90 backward ran
24% faster than ours on dense 32K in the same H200 run: bench/results/kernels_fa4peer_*_h200_2026-12-03.json):
``LSE_SMEM`` (the loader warp puts each step's lse2/delta in shared memory, read by the consumers in the S^T column
layout: no global loads and no layout shuffle, 4 partition barriers fewer per step; ptxas spills 112 -> 8 B) and
``DQ_FIRST`` (dQ issued before dK and staged / sent while dK runs, FlashAttention-3's order). Each variant first
runs ``check_sm90_backward`` (vs the all-Triton backward and fp32), then the backward alone through
tk.attention_backward, B1 Hq32 Hkv8 D128 causal bf16, dense and S2, variants alternated over ROUNDS; each
variant's grads against the first's.
PYTHONPATH=. python bench/experiments/gluon_dkdv/knobs3.py
(VARIANTS="DQ_FIRST=0:LSE_SMEM=0,..." LENS=32768,131072 KINDS=dense,s2 ROUNDS=2; $OUT/gluon_bwd_knobs3.json)"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "flash_tma"))
from harness import Rows, alternate, backward_case, check_variants, knob_variants  # noqa: E402
from longreach.kernels.flash import gluon_sm90_bwd as gb  # noqa: E402
from longreach.launch.bench.kernels import check_sm90_backward  # noqa: E402

rows = Rows(os.environ.get("NAME", "gluon_bwd_knobs3"))
VARIANTS, use = knob_variants(gb, os.environ.get("VARIANTS", "DQ_FIRST=0:LSE_SMEM=0,DQ_FIRST=0:LSE_SMEM=1,"
                                                 "DQ_FIRST=1:LSE_SMEM=0,DQ_FIRST=1:LSE_SMEM=1"))

check_variants(rows, VARIANTS, use, check_sm90_backward, gb._BROKEN, worst=True)

for S in [int(x) for x in os.environ.get("LENS", "32768,131072").split(",")]:
    for kind in os.environ.get("KINDS", "dense,s2").split(","):
        run = backward_case(S, kind == "s2")
        alternate(rows, run, VARIANTS, use, int(os.environ.get("ROUNDS", "2")), 400 if S < 100000 else 2000,
                  gb._BROKEN, S=S, kind=kind)
        use(VARIANTS[0])
        torch.cuda.empty_cache()
use(None)
