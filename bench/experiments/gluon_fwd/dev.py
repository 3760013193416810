"""GPU check and timing of the Gluon forward (fwd_ws.py) against the Triton forward and an fp32 reference.
PYTHONPATH=. python bench/experiments/gluon_fwd/dev.py  (writes $OUT/gluon_fwd_dev.json; LENS=32768,131072)"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "flash_tma"))
sys.path.insert(0, HERE)
import fwd_ws  # noqa: E402
from harness import Rows, bench, rel  # noqa: E402
from longreach.kernels.flash import reference as ref  # noqa: E402
from longreach.kernels.flash import triton as tk  # noqa: E402
from longreach.kernels.s2 import S2Pattern  # noqa: E402
from longreach.kernels.s2.triton import sparse_args  # noqa: E402

rows = Rows(os.environ.get("NAME", "gluon_fwd_dev"))
dev = "cuda"


def both(q, k, v, cu, max_q, causal, pat):
    hkv = k.shape[1]
    sp = sparse_args(pat, hkv, dev) if pat else None
    t = tk.attention_forward(q, k, v, cu, cu, max_q, causal=causal, scale=q.shape[-1] ** -0.5,
                             out_dtype=q.dtype, sparse=sp, pack=q.shape[1] // hkv if pat else 1)
    spt = (sp.block, sp.window_blocks, sp.sink_blocks, sp.stride) if sp else (128, 1, 0, 1)
    g = lambda: fwd_ws.attention_forward(q, k, v, cu, cu, max_q, causal=causal, scale=q.shape[-1] ** -0.5,  # noqa
                                         sparse=sp, dense_heads=sp.dense_heads if sp else None, sp=spt)
    return t, g


def check(name, lens, hq, hkv, d, causal=True, pat=None):
    return all([check1(name, lens, hq, hkv, d, causal, pat, ov, pp) for ov in (0, 1) for pp in (0, 1)])


def check1(name, lens, hq, hkv, d, causal, pat, overlap, pingpong):
    fwd_ws.OVERLAP, fwd_ws.PINGPONG = overlap, pingpong
    torch.manual_seed(0)
    T = sum(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=dev)
    q, k, v = (torch.randn(T, h, d, device=dev, dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    (to, tl_), g = both(q, k, v, cu, max(lens), causal, pat)
    go, gl_ = g()
    allowed = (lambda doc, sq, sk: pat.token_mask(sq, hkv, device=dev)) if pat else None
    ro, rl = ref.attention_reference(q.float(), k.float(), v.float(), cu, cu, causal=causal, scale=d ** -0.5,
                                     allowed=allowed)
    e = dict(out_gluon=rel(go, ro), out_triton=rel(to, ro), lse_gluon=rel(gl_, rl), lse_triton=rel(tl_, rl))
    ok = e["out_gluon"] <= 2 * e["out_triton"] + 1e-3 and e["lse_gluon"] <= 1e-4
    rows.rec(kind="check", name=name, overlap=overlap, pingpong=pingpong, ok=ok, **e)
    return ok


good = True
good &= check("dense 1000", [1000], 32, 8, 128)
good &= check("dense docs", [1000, 1900, 1196], 32, 8, 128)
good &= check("d64 mha 777", [777], 8, 8, 64)
good &= check("noncausal", [600, 333], 4, 2, 128, causal=False)
good &= check("s2 3000", [3000], 32, 8, 128, pat=S2Pattern(128, 512, 128, 4))
good &= check("s2 docs", [1500, 2100], 16, 4, 128, pat=S2Pattern(128, 256, 0, 8))
print("ALL OK" if good else "SOME FAILED", flush=True)
hq, hkv, d = 32, 8, 128
for S in [int(x) for x in os.environ.get("LENS", "32768,131072").split(",")]:
    cu = torch.tensor([0, S], dtype=torch.int32, device=dev)
    q, k, v = (torch.randn(S, h, d, device=dev, dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    for pat in (None, S2Pattern(128, 2048, 128, 8)):
        fl = 2.0 * S * S * hq * d * (pat.density(S, hkv) if pat else 1.0)
        (to, _), g = both(q, k, v, cu, S, True, pat)
        sp = sparse_args(pat, hkv, dev) if pat else None
        ms_t = bench(lambda: tk.attention_forward(q, k, v, cu, cu, S, causal=True, scale=d ** -0.5,
                                                  out_dtype=q.dtype, sparse=sp, pack=hq // hkv if pat else 1))
        for overlap, stages, pingpong in ((0, 2, 0), (1, 3, 0), (0, 2, 1), (1, 3, 1), (1, 2, 1)):
            fwd_ws.STAGES, fwd_ws.OVERLAP, fwd_ws.PINGPONG = stages, overlap, pingpong
            ms = bench(g)
            rows.rec(kind="bench", S=S, s2=pat is not None, overlap=overlap, stages=stages, pingpong=pingpong,
                     gluon_ms=ms,
                     triton_ms=ms_t, gluon_tflops=fl / ms / 1e9, triton_tflops=fl / ms_t / 1e9,
                     rel_vs_triton=rel(g()[0], to))
        fwd_ws.STAGES, fwd_ws.OVERLAP, fwd_ws.PINGPONG = 2, 0, 0
    del q, k, v
    torch.cuda.empty_cache()
