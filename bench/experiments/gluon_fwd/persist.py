"""A/B in one process: the Gluon forward one CTA per work item vs persistent (gluon_sm90.PERSIST: one CTA per SM
walking a snake of the items), dense and S2, alternated for ROUNDS rounds; forward alone through
tk.attention_forward. PACKS=1,2,4: S2's q tile packing (default: the GQA group).
PYTHONPATH=. python bench/experiments/gluon_fwd/persist.py  ($OUT/gluon_fwd_persist.json)"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "flash_tma"))
from harness import Rows, bench, rel  # noqa: E402
from longreach.kernels.flash import gluon_sm90 as g  # noqa: E402
from longreach.kernels.flash import triton as tk  # noqa: E402
from longreach.kernels.s2 import S2Pattern  # noqa: E402
from longreach.kernels.s2.triton import sparse_args  # noqa: E402

rows = Rows(os.environ.get("NAME", "gluon_fwd_persist"))
hq, hkv, d = 32, 8, 128
for S in [int(x) for x in os.environ.get("LENS", "8192,32768,131072").split(",")]:
    torch.manual_seed(0)
    q = torch.randn(S, hq, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(S, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cu = torch.tensor([0, S], dtype=torch.int32, device="cuda")
    for s2 in [bool(int(x)) for x in os.environ.get("S2", "1,0").split(",")]:
        sp = sparse_args(S2Pattern(128, 2048, 128, 8), hkv, "cuda") if s2 else None
        packs = [int(x) for x in os.environ.get("PACKS", str(hq // hkv)).split(",")] if s2 else [1]

        def run():
            return tk.attention_forward(q, k, v, cu, cu, S, causal=True, scale=d ** -0.5, out_dtype=q.dtype,
                                        sparse=sp, pack=pack)

        ref = None
        for rnd in range(int(os.environ.get("ROUNDS", "3"))):
            for pack in packs:
                for persist in (False, True):
                    g.OVERRIDE_PERSIST.update({False: persist, True: persist})
                    o, lse = run()
                    ref = (o, lse) if ref is None else ref
                    rows.rec(S=S, s2=s2, pack=pack, persist=persist, round=rnd,
                             fwd_ms=bench(run, rep=300 if S < 100000 else 100),
                             vs_first=max(rel(o, ref[0]), rel(lse, ref[1])), broken=list(g._BROKEN))
        g.OVERRIDE_PERSIST.clear()
    del q, k, v
    torch.cuda.empty_cache()
