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
from harness import Rows, bench, rel  # noqa: E402
from longreach.kernels.flash import gluon_sm90_bwd as gb  # noqa: E402
from longreach.kernels.flash import triton as tk  # noqa: E402
from longreach.kernels.s2 import S2Pattern  # noqa: E402
from longreach.kernels.s2.triton import sparse_args  # noqa: E402

rows = Rows(os.environ.get("NAME", "gluon_bwd_sweep"))
NAMES = ("STAGES_ATOMIC", "PINGPONG", "WAIT_DV")
DEFAULTS = tuple(getattr(gb, n) for n in NAMES)
WDF = gb.WAIT_DV_FUSED
CHUNK_BYTES = tk.FUSED_DQ_MAX_BYTES
hq, hkv, d = 32, 8, 128
VARIANTS = os.environ.get("VARIANTS", "0:2:1:0,1:2:1:1,1:2:0:1").split(",")


def setv(var):
    vals = [int(x) for x in var.split(":")]
    for n, x in zip(NAMES, DEFAULTS):
        setattr(gb, n, x)
    for n, x in zip(NAMES, vals[1:]):
        setattr(gb, n, x)
    gb.WAIT_DV_FUSED = gb.WAIT_DV  # WAIT_DV is the fused one's in MODE 1
    tk.FUSED_DQ_MAX_BYTES = 1 << vals[4] if len(vals) > 4 else CHUNK_BYTES
    tk.OVERRIDE.clear()
    tk.OVERRIDE.update(gluon_bwd=True, gluon_atomic_dq=vals[0] != 0)


for S in [int(x) for x in os.environ.get("LENS", "32768").split(",")]:
    for s2 in [bool(int(x)) for x in os.environ.get("S2", "0").split(",")]:
        torch.manual_seed(0)
        q = torch.randn(S, hq, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(S, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        do = torch.randn_like(q)
        cu = torch.tensor([0, S], dtype=torch.int32, device="cuda")
        sp = sparse_args(S2Pattern(128, 2048, 128, 8), hkv, "cuda") if s2 else None
        pack = hq // hkv if s2 else 1
        out, lse = tk.attention_forward(q, k, v, cu, cu, S, causal=True, scale=d ** -0.5, out_dtype=q.dtype,
                                        sparse=sp, pack=pack)

        def run():
            return tk.attention_backward(do, q, k, v, out, lse, cu, cu, S, S, causal=True, scale=d ** -0.5,
                                         sparse=sp, pack=pack)

        rep = 100 if S < 100000 else 30
        ref = None
        for rnd in range(int(os.environ.get("ROUNDS", "1"))):
            for var in VARIANTS:
                setv(var)
                g = run()
                ref = g if ref is None else ref
                rows.rec(S=S, s2=s2, variant=var, round=rnd, bwd_ms=bench(run, rep=rep),
                         vs_first=[rel(a, b) for a, b in zip(g, ref)], broken=list(gb._BROKEN))
                del g
        tk.OVERRIDE.clear()
        for n, x in zip(NAMES, DEFAULTS):
            setattr(gb, n, x)
        gb.WAIT_DV_FUSED = WDF
        tk.FUSED_DQ_MAX_BYTES = CHUNK_BYTES
        torch.cuda.empty_cache()
