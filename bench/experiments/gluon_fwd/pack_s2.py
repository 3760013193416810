"""S2 forward (block 128, window 2048, sink 128, stride 8) through tk.attention_forward, the Gluon sm_90 kernel's q
tile packing (q heads of a GQA group per 128-row tile) and persistence varied (VARIANTS of pack:persist), rounds
alternated in one process. PYTHONPATH=. python bench/experiments/gluon_fwd/pack_s2.py
(LENS=32768,131072 VARIANTS=4:1,2:1,1:1,4:0 ROUNDS=3; $OUT/gluon_fwd_pack_s2.json)"""
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

rows = Rows(os.environ.get("NAME", "gluon_fwd_pack_s2"))
hq, hkv, d = 32, 8, 128
variants = [tuple(int(y) for y in x.split(":")) for x in os.environ.get("VARIANTS", "4:1,2:1,1:1,4:0").split(",")]
pat = S2Pattern(128, 2048, 128, 8)
for S in [int(x) for x in os.environ.get("LENS", "32768,131072").split(",")]:
    torch.manual_seed(0)
    cu = torch.tensor([0, S], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(S, h, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    fl = 2.0 * S * S * hq * d * pat.density(S, hkv)
    sp = sparse_args(pat, hkv, "cuda")
    f = lambda: tk.attention_forward(q, k, v, cu, cu, S, causal=True, scale=d ** -0.5,  # noqa: E731
                                     out_dtype=q.dtype, sparse=sp, pack=hq // hkv)
    ref = None
    for rnd in range(int(os.environ.get("ROUNDS", "3"))):
        for gpack, persist in variants:
            tk.OVERRIDE["gluon_pack"] = gpack
            g.OVERRIDE_PERSIST[True] = bool(persist)
            o = f()[0]
            ref = o if ref is None else ref
            ms = bench(f, rep=300 if S < 100000 else 1000)
            rows.rec(S=S, gluon_pack=gpack, persist=persist, round=rnd, fwd_ms=ms, tflops=fl / ms / 1e9,
                     vs_first=rel(o, ref))
    tk.OVERRIDE.clear()
    g.OVERRIDE_PERSIST.clear()
    del q, k, v
    torch.cuda.empty_cache()
