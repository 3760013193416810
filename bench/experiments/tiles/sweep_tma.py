"""Re-sweep of the production kernels' tiles now that the backward streams tiles by TMA (register pressure changed):
each (kernel, tile) override times the forward or the whole backward (dense causal and S2) at 32K, and its outputs
are compared with the default tiles'. PYTHONPATH=. python bench/experiments/tiles/sweep_tma.py  (writes $OUT/sweep_tma.json)"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "flash_tma"))
from harness import Rows, bench, rel  # noqa: E402
from longreach.kernels.flash import triton as tk  # noqa: E402
from longreach.kernels.s2 import S2Pattern  # noqa: E402
from longreach.kernels.s2.triton import sparse_args  # noqa: E402

T = tk.Tile
S = int(os.environ.get("S", "32768"))
hq, hkv, d = 32, 8, 128
pat = S2Pattern(128, 2048, 128, 8)
rows = Rows("sweep_tma")
cu = torch.tensor([0, S], dtype=torch.int32, device="cuda")
q = torch.randn(S, hq, d, device="cuda", dtype=torch.bfloat16)
k = torch.randn(S, hkv, d, device="cuda", dtype=torch.bfloat16)
v = torch.randn(S, hkv, d, device="cuda", dtype=torch.bfloat16)
do = torch.randn_like(q)
BWD = [("dkdv", T(64, 128, 8, 2)), ("dkdv", T(64, 128, 8, 4)), ("dkdv", T(32, 128, 8, 2)), ("dkdv", T(32, 128, 8, 3)),
       ("dkdv", T(64, 64, 4, 3)), ("dq", T(128, 64, 8, 2)), ("dq", T(128, 64, 8, 4)), ("dq", T(128, 32, 8, 2)),
       ("dq", T(128, 32, 8, 3)), ("dq", T(64, 64, 4, 2)), ("dq", T(64, 64, 4, 3)), ("dq", T(64, 128, 8, 3)),
       ("dq", T(128, 128, 8, 2))]
FWD = [("fwd", T(128, 128, 8, 2)), ("fwd", T(128, 128, 8, 4)), ("fwd", T(128, 64, 8, 3)), ("fwd", T(128, 64, 8, 4))]
for sparse in (False, True):
    sp = sparse_args(pat, hkv, "cuda") if sparse else None
    pack = hq // hkv if sparse else 1

    def fwd():
        return tk.attention_forward(q, k, v, cu, cu, S, causal=True, scale=d ** -0.5, out_dtype=torch.bfloat16,
                                    sparse=sp, pack=pack)

    tk.OVERRIDE.clear()
    out, lse = fwd()

    def bwd():
        return tk.attention_backward(do, q, k, v, out, lse, cu, cu, S, S, causal=True, scale=d ** -0.5, sparse=sp,
                                     pack=pack)

    ref_f, ref_b = (out.clone(),), bwd()
    for kern, tile in [(None, None)] + FWD + BWD:
        tk.OVERRIDE.clear()
        if kern:
            tk.OVERRIDE[(kern, sparse)] = tile
        fn = fwd if kern == "fwd" else bwd
        name = "default" if kern is None else f"{kern} {tile.m}x{tile.n} w{tile.warps} s{tile.stages}"
        try:
            r = fn()
            r = r[:1] if kern == "fwd" else r
            diff = [rel(a, b) for a, b in zip(r, ref_f if kern == "fwd" else ref_b)]
            ms = bench(fn, rep=300)
            rows.rec(sparse=sparse, kernel=kern or "bwd", tile=name, ms=ms, diff=diff,
                     stats={n: list(x) for n, x in tk.STATS.items()})
            if kern is None:
                rows.rec(sparse=sparse, kernel="fwd", tile="default", ms=bench(fwd, rep=300))
        except Exception as e:  # noqa: BLE001 - a tile that does not fit is a result
            rows.rec(sparse=sparse, kernel=kern, tile=name, err=f"{type(e).__name__}: {str(e)[:200]}")
    tk.OVERRIDE.clear()
