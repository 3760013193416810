"""A/B in one process: flash_attention / s2_attention forward and forward+backward with the Gluon sm_90 forward on and
off (alternated, 3 rounds), the backward alone from saved tensors.
PYTHONPATH=. python bench/experiments/gluon_fwd/ab.py  (writes $OUT/gluon_fwd_ab.json)"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "flash_tma"))
from harness import Rows, bench  # noqa: E402
from longreach.kernels import flash_attention, s2_attention  # noqa: E402
from longreach.kernels.flash import triton as tk  # noqa: E402

rows = Rows("gluon_fwd_ab")
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

        for rnd in range(3):
            for on in (True, False):
                tk.OVERRIDE["gluon_fwd"] = on
                with torch.no_grad():
                    ms_f = bench(f, rep=200)
                ms_fb = bench(step, rep=400)
                o = f()
                ms_b = bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True), rep=400)
                rows.rec(S=S, s2=s2, gluon_fwd=on, round=rnd, fwd_ms=ms_f, fwdbwd_ms=ms_fb, bwd_ms=ms_b)
        tk.OVERRIDE.clear()
    del q, k, v, do
    torch.cuda.empty_cache()
