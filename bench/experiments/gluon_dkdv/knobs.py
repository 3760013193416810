"""Fused-dq backward knobs (``gluon_sm90_bwd.DK_RS`` / ``PINGPONG_FUSED``): dK's dS^T operand from registers
instead of the shared tile both consumers write for dQ (less shared-memory read traffic per step, the kernel being
bound there), and the consumers' turn barrier on/off. Backward alone through tk.attention_backward (production
dispatch: fused dq, S2 in q chunks, dense past 32K in q chunks), B1 Hq32 Hkv8 D128 causal bf16, dense and S2 (block
128, window 2048, sink 128, stride 8), variants RS:PP alternated over ROUNDS; each variant's grads against the first's.
PYTHONPATH=. python bench/experiments/gluon_dkdv/knobs.py
(LENS=32768,131072 KINDS=dense,s2 VARIANTS=0:1,1:1,0:0,1:0 ROUNDS=2; $OUT/gluon_bwd_knobs.json; the defaults were
0:1 when it ran, now 1:0)"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "flash_tma"))
from harness import Rows, alternate, backward_case  # noqa: E402
from longreach.kernels.flash import gluon_sm90_bwd as gb  # noqa: E402

rows = Rows(os.environ.get("NAME", "gluon_bwd_knobs"))
VARIANTS = os.environ.get("VARIANTS", "0:1,1:1,0:0,1:0").split(",")
defaults = (gb.DK_RS, gb.PINGPONG_FUSED)

for S in [int(x) for x in os.environ.get("LENS", "32768,131072").split(",")]:
    for kind in os.environ.get("KINDS", "dense,s2").split(","):
        run = backward_case(S, kind == "s2")

        def use(var):
            gb.DK_RS, gb.PINGPONG_FUSED = (int(x) for x in var.split(":"))

        alternate(rows, run, VARIANTS, use, int(os.environ.get("ROUNDS", "2")), 400 if S < 100000 else 2000,
                  gb._BROKEN, S=S, kind=kind)
        gb.DK_RS, gb.PINGPONG_FUSED = defaults
        torch.cuda.empty_cache()
