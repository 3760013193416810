"""Confirm the sweep's picks (sweep_tma.py) against the default tiles, alternating A/B/A/B in one process, at 32K and
128K. PYTHONPATH=. python bench/experiments/tiles/confirm_tma.py  (writes $OUT/confirm_tma.json)"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "flash_tma"))
from harness import Rows, bench  # noqa: E402
from longreach.kernels.flash import triton as tk  # noqa: E402
from longreach.kernels.s2 import S2Pattern  # noqa: E402
from longreach.kernels.s2.triton import sparse_args  # noqa: E402

T = tk.Tile
hq, hkv, d = 32, 8, 128
pat = S2Pattern(128, 2048, 128, 8)
rows = Rows("confirm_tma")
CANDS = {
    (False, "bwd"): {("dkdv", False): T(64, 128, 8, 4), ("dq", False): T(128, 64, 8, 4)},
    (False, "fwd"): {("fwd", False): T(128, 64, 8, 3)},
    (True, "bwd"): {("dq", True): T(128, 64, 8, 4)},
}
for S in (32768, 131072):
    cu = torch.tensor([0, S], dtype=torch.int32, device="cuda")
    q = torch.randn(S, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(S, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(S, hkv, d, device="cuda", dtype=torch.bfloat16)
    do = torch.randn_like(q)
    for (sparse, what), ov in CANDS.items():
        sp = sparse_args(pat, hkv, "cuda") if sparse else None
        pack = hq // hkv if sparse else 1
        tk.OVERRIDE.clear()
        out, lse = tk.attention_forward(q, k, v, cu, cu, S, causal=True, scale=d ** -0.5, out_dtype=torch.bfloat16,
                                        sparse=sp, pack=pack)
        if what == "fwd":
            fn = lambda: tk.attention_forward(q, k, v, cu, cu, S, causal=True, scale=d ** -0.5,  # noqa: E731
                                              out_dtype=torch.bfloat16, sparse=sp, pack=pack)
        else:
            fn = lambda: tk.attention_backward(do, q, k, v, out, lse, cu, cu, S, S, causal=True,  # noqa: E731
                                               scale=d ** -0.5, sparse=sp, pack=pack)
        res = {"default": [], "pick": []}
        for _ in range(2):
            for arm in ("default", "pick"):
                tk.OVERRIDE.clear()
                if arm == "pick":
                    tk.OVERRIDE.update(ov)
                res[arm].append(bench(fn, rep=400 if S == 32768 else 1500))
        tk.OVERRIDE.clear()
        rows.rec(S=S, sparse=sparse, what=what, tiles={f"{a}_{'s2' if b else 'dense'}": [t.m, t.n, t.warps, t.stages]
                                                     for (a, b), t in ov.items()}, **res)
    del q, k, v, do, out, lse
    torch.cuda.empty_cache()
