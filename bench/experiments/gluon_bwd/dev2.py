"""Variants of the Gluon backward (files under variants/, each a copy of gluon_bwd.py with one change): a small
correctness check against the Triton backward, then backward timings at 32K (dense, S2) against it.
VARIANTS="ws:,d:ABLATE=0,pipelined:" PYTHONPATH=. python bench/experiments/gluon_bwd/dev2.py"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "flash_tma"))
from harness import Rows, bench, rel  # noqa: E402
from longreach.kernels.flash import triton as tk  # noqa: E402
from longreach.kernels.s2 import S2Pattern  # noqa: E402

rows = Rows("gluon_bwd_dev2")
dev = "cuda"
here = os.path.dirname(os.path.abspath(__file__))


sys.path.insert(0, here)
import common  # noqa: E402
load = common.load
MOD = [None]


def use(mod):
    MOD[0] = mod


def bwd(gluon, do, q, k, v, out, lse, cu, S, sp, pack, causal=True):
    if gluon:
        return common.backward(MOD[0], do, q, k, v, out, lse, cu, S, causal=causal, sparse=sp)
    return tk.attention_backward(do, q, k, v, out, lse, cu, cu, S, S, causal=causal, scale=q.shape[-1] ** -0.5,
                                 sparse=sp, pack=pack)


data = common.data


variants = [x.split(":") for x in os.environ.get("VARIANTS", "ws:").split(",")]
small = [("dense docs", [1000, 1900, 1196], 32, 8, 128, None),
         ("s2 docs", [1500, 2100], 16, 4, 128, S2Pattern(128, 256, 128, 8))]
S = int(os.environ.get("S", "32768"))
big = [("dense", [S], 32, 8, 128, None), ("s2", [S], 32, 8, 128, S2Pattern(128, 2048, 128, 8))]
for name, lens, hq, hkv, d, pat in small + big:
    args = data(lens, hq, hkv, d, pat)
    ref = bwd(False, *args)
    if len(lens) == 1:
        rows.rec(name=name, S=S, var="triton", bwd_ms=bench(lambda: bwd(False, *args), rep=150))
    for vname, opts in variants:
        mod = load(vname)
        for kv in opts.split(";") if opts else []:
            kk, vv = kv.split("=")
            setattr(mod, kk, int(vv))
        use(mod)
        g = bwd(True, *args)
        err = [rel(a, b) for a, b in zip(g, ref)]
        r = dict(name=name, var=f"{vname}:{opts}", rel_vs_triton=err)
        if len(lens) == 1:
            r["bwd_ms"] = bench(lambda: bwd(True, *args), rep=150)
        rows.rec(**r)
    del args, ref
    torch.cuda.empty_cache()
