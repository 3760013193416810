"""A/B in one process of the backward's three paths, through the public flash_attention / s2_attention: all Triton
(Gluon dk/dv off), Gluon dk/dv + Triton dq (the hybrid), and Gluon dk/dv with dq added in by fp32 TMA reduce-adds
(5 matmuls per tile pair; MODES=atomic:S sets STAGES_ATOMIC). Then the GPU checks of check_sm90_backward (both Gluon modes against the Triton backward and fp32).
PYTHONPATH=. python bench/experiments/gluon_dkdv/ab.py  (writes $OUT/gluon_bwd_ab.json; LENS=32768,131072)"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "flash_tma"))
from harness import Rows, bench  # noqa: E402
from longreach.kernels import flash_attention, s2_attention  # noqa: E402
from longreach.kernels.flash import gluon_sm90_bwd as gb  # noqa: E402
from longreach.kernels.flash import triton as tk  # noqa: E402
from longreach.launch.bench.kernels import check_sm90_backward  # noqa: E402

rows = Rows("gluon_bwd_ab")
MODES = {"triton": dict(gluon_bwd=False), "hybrid": dict(gluon_bwd=True, gluon_atomic_dq=False),
         "atomic": dict(gluon_bwd=True, gluon_atomic_dq=True)}
if not os.environ.get("SKIP_CHECK"):
    rows.rec(kind="check", all_ok=all(r.get("ok", True) for r in check_sm90_backward()))
MODES = {m: MODES[m.split(":")[0]] for m in os.environ.get("MODES", ",".join(MODES)).split(",")}
# "atomic:S": the fused dq with STAGES_ATOMIC=S (the results of 2026-12-02 name atomic:P:S, P a since removed
# DQ_PARTS: 1 is today's kernel)
DEFAULT_STAGES = gb.STAGES_ATOMIC


def variant(mode):
    gb.STAGES_ATOMIC = int(mode.split(":")[1]) if ":" in mode else DEFAULT_STAGES


ROUNDS = int(os.environ.get("ROUNDS", "2"))
hq, hkv, d = 32, 8, 128
for S in [int(x) for x in os.environ.get("LENS", "32768,131072").split(",")]:
    q, k, v = (torch.randn(1, S, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (hq, hkv, hkv))
    do = torch.randn(1, S, hq, d, device="cuda", dtype=torch.bfloat16)
    for s2 in (False, True):
        f = (lambda: s2_attention(q, k, v, block=128, window=2048, sink=128, stride=8, return_lse=False)) if s2 \
            else (lambda: flash_attention(q, k, v, causal=True, return_lse=False))

        def step():
            q.grad = k.grad = v.grad = None
            f().backward(do)

        ref = None
        for rnd in range(ROUNDS):
            for mode, ov in MODES.items():
                variant(mode)
                tk.OVERRIDE.clear()
                tk.OVERRIDE.update(ov)
                ms_fb = bench(step, rep=300 if S < 100000 else 150)
                o = f()
                ms_b = bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True),
                             rep=300 if S < 100000 else 150)
                g = torch.autograd.grad(o, (q, k, v), do)
                if ref is None:
                    ref = g
                err = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(g, ref)]
                rows.rec(kind="bench", S=S, s2=s2, mode=mode, round=rnd, fwdbwd_ms=ms_fb, bwd_ms=ms_b,
                         dq_dk_dv_vs_triton=err)
                del o, g
        tk.OVERRIDE.clear()
        del ref
    del q, k, v, do
    torch.cuda.empty_cache()
