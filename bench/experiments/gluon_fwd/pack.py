"""Package forward on the GPU: the Triton kernel vs the Gluon sm_90 kernel, its q tile packing 1 or the GQA group.
PYTHONPATH=. python bench/experiments/gluon_fwd/pack.py  (writes $OUT/gluon_fwd_pack.json; LENS=32768,131072)"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "flash_tma"))
from harness import Rows, bench, rel  # noqa: E402
from longreach.kernels.flash import triton as tk  # noqa: E402
from longreach.kernels.s2 import S2Pattern  # noqa: E402
from longreach.kernels.s2.triton import sparse_args  # noqa: E402

rows = Rows("gluon_fwd_pack")
hq, hkv, d = 32, 8, 128
for S in [int(x) for x in os.environ.get("LENS", "32768,131072").split(",")]:
    cu = torch.tensor([0, S], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(S, h, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    for pat in (None, S2Pattern(128, 2048, 128, 8)):
        fl = 2.0 * S * S * hq * d * (pat.density(S, hkv) if pat else 1.0)
        sp = sparse_args(pat, hkv, "cuda") if pat else None
        f = lambda: tk.attention_forward(q, k, v, cu, cu, S, causal=True, scale=d ** -0.5,  # noqa: E731
                                         out_dtype=q.dtype, sparse=sp, pack=hq // hkv if pat else 1)
        tk.OVERRIDE["gluon_fwd"] = False
        ref = f()[0]
        ms_t = bench(f)
        tk.OVERRIDE["gluon_fwd"] = True
        for gpack in (1, 4) * 2:  # twice, alternated: run-to-run drift
            tk.OVERRIDE["gluon_pack"] = gpack
            ms = bench(f)
            rows.rec(S=S, s2=pat is not None, gluon_pack=gpack, gluon_ms=ms, triton_ms=ms_t,
                     gluon_tflops=fl / ms / 1e9, triton_tflops=fl / ms_t / 1e9, rel_vs_triton=rel(f()[0], ref))
        tk.OVERRIDE.clear()
    del q, k, v
    torch.cuda.empty_cache()
