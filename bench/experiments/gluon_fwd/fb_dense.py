"""Dense forward+backward and backward alone through flash_attention at LENS (default 131072), B1 Hq32 Hkv8 D128
causal bf16, the forward's NAMED_TURN knob alternated over ROUNDS, to tell a kernel change from run-to-run (clock)
variation; run beside `nvidia-smi -lms` for the clocks. PYTHONPATH=. python bench/experiments/gluon_fwd/fb_dense.py"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "flash_tma"))
from harness import Rows, bench  # noqa: E402
from longreach.kernels import flash_attention  # noqa: E402
from longreach.kernels.flash import gluon_sm90 as g  # noqa: E402

rows = Rows(os.environ.get("NAME", "gluon_fwd_fb_dense"))
hq, hkv, d = 32, 8, 128
for S in [int(x) for x in os.environ.get("LENS", "131072").split(",")]:
    q, k, v = (torch.randn(1, S, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (hq, hkv, hkv))
    do = torch.randn(1, S, hq, d, device="cuda", dtype=torch.bfloat16)
    f = lambda: flash_attention(q, k, v, causal=True, return_lse=False)  # noqa: E731

    def step():
        q.grad = k.grad = v.grad = None
        f().backward(do)

    for rnd in range(int(os.environ.get("ROUNDS", "2"))):
        for named in (1, 0):
            g.NAMED_TURN = named
            o = f()
            ms_b = bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True), rep=3000)
            rows.rec(S=S, named_turn=named, round=rnd, fwdbwd_ms=bench(step, rep=3000), bwd_ms=ms_b)
            del o
g.NAMED_TURN = 1
