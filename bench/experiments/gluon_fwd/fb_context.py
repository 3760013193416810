"""Why `longreach bench kernels` reads our dense 128K forward+backward ~8% slower than the same call timed alone
(bench/experiments/gluon_fwd/fb_dense.py): in one process, rounds alternating (a) fb_dense's loop (do_bench, rep 3000
ms), (b) the bench's own _time_pair on its _methods()["ours_flash"] with all the peers' inputs built, (c) (b) with the
other methods' objects dropped. PYTHONPATH=. python bench/experiments/gluon_fwd/fb_context.py"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "flash_tma"))
from harness import Rows, bench  # noqa: E402
from longreach.kernels import flash_attention  # noqa: E402
from longreach.kernels.s2 import S2Pattern  # noqa: E402
from longreach.launch.bench import kernels as kb  # noqa: E402

rows = Rows(os.environ.get("NAME", "gluon_fwd_fb_context"))
S, hq, hkv, d = int(os.environ.get("S", "131072")), 32, 8, 128
q, k, v = (torch.randn(1, S, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (hq, hkv, hkv))
do = torch.randn(1, S, hq, d, device="cuda", dtype=torch.bfloat16)


def step():
    q.grad = k.grad = v.grad = None
    flash_attention(q, k, v, causal=True, return_lse=False).backward(do)


skip = {"sdpa_flash", "fa4", "fa4_s2"}
for rnd in range(int(os.environ.get("ROUNDS", "2"))):
    rows.rec(round=rnd, how="fb_dense loop", fwdbwd_ms=bench(step, rep=3000))
    methods = kb._methods(S, hq, hkv, d, S2Pattern(), skip)
    fwd, params, _ = methods["ours_flash"]
    for reps in (300, 3000):
        t_f, t_fb = kb._time_pair(fwd, params, reps)
        rows.rec(round=rnd, how=f"bench _time_pair reps {reps}, all methods built", fwd_ms=t_f, fwdbwd_ms=t_fb)
    qkv = list(params)
    del methods, params, fwd
    torch.cuda.empty_cache()
    t_f, t_fb = kb._time_pair(lambda: flash_attention(*qkv, causal=True, return_lse=False), qkv, 300)
    rows.rec(round=rnd, how="bench _time_pair reps 300, bench inputs only", fwd_ms=t_f, fwdbwd_ms=t_fb)
    torch.cuda.empty_cache()
