"""Sweep of the Gluon backward's constants on the backward alone through tk.attention_backward, in one process.
A variant is MODE:STAGES:PINGPONG:WAIT_DV[:LOG2_BYTES]: MODE 0 is the hybrid (Gluon dk/dv + Triton dq), 1 the fused dq
(STAGES: gluon_sm90_bwd.STAGES_ATOMIC), LOG2_BYTES that of triton.FUSED_DQ_MAX_BYTES (the q chunk; 40: no chunks).
The results of 2026-12-02 were taken with knobs since removed from the kernel (variants MODE:PARTS:STAGES:PINGPONG:
WAIT_DV:HEAD_INNER:DQ_OUT:LOG2_BYTES; bench/experiments/gluon_dkdv/README.md has what each lost).
PYTHONPATH=. python bench/experiments/gluon_dkdv/sweep.py  (VARIANTS=..., LENS, S2=0,1; $OUT/gluon_bwd_sweep.json)"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "flash_tma"))
from harness import Rows, alternate, backward_case  # noqa: E402
from longreach.kernels.flash import gluon_sm90_bwd as gb  # noqa: E402
from longreach.kernels.flash import triton as tk  # noqa: E402

rows = Rows(os.environ.get("NAME", "gluon_bwd_sweep"))
NAMES = ("STAGES_ATOMIC", "PINGPONG", "WAIT_DV")
DEFAULTS = tuple(getattr(gb, n) for n in NAMES)
WDF, PPF = gb.WAIT_DV_FUSED, gb.PINGPONG_FUSED
CHUNK_BYTES = tk.FUSED_DQ_MAX_BYTES
VARIANTS = os.environ.get("VARIANTS", "0:2:1:0,1:2:1:1,1:2:0:1").split(",")


def setv(var):
    vals = [int(x) for x in var.split(":")]
    for n, x in zip(NAMES, DEFAULTS):
        setattr(gb, n, x)
    for n, x in zip(NAMES, vals[1:]):
        setattr(gb, n, x)
    gb.WAIT_DV_FUSED = gb.WAIT_DV  # WAIT_DV / PINGPONG are the fused one's in MODE 1
    gb.PINGPONG_FUSED = gb.PINGPONG
    tk.FUSED_DQ_MAX_BYTES = 1 << vals[4] if len(vals) > 4 else CHUNK_BYTES
    tk.OVERRIDE.clear()
    tk.OVERRIDE.update(gluon_bwd=True, gluon_atomic_dq=vals[0] != 0)


for S in [int(x) for x in os.environ.get("LENS", "32768").split(",")]:
    for s2 in [bool(int(x)) for x in os.environ.get("S2", "0").split(",")]:
        run = backward_case(S, s2)

        alternate(rows, run, VARIANTS, setv, int(os.environ.get("ROUNDS", "1")), 100 if S < 100000 else 30,
                  gb._BROKEN, S=S, s2=s2)
        tk.OVERRIDE.clear()
        for n, x in zip(NAMES, DEFAULTS):
            setattr(gb, n, x)
        gb.WAIT_DV_FUSED, gb.PINGPONG_FUSED = WDF, PPF
        tk.FUSED_DQ_MAX_BYTES = CHUNK_BYTES
        torch.cuda.empty_cache()
