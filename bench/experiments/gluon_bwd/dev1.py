"""A Gluon sm_90 backward variant (GB_VARIANT, default ws) vs the Triton backward and an fp32 reference
(correctness), then backward timings at 32K/128K (LENS). PYTHONPATH=. python bench/experiments/gluon_bwd/dev1.py
[--no-bench] [--no-check]. Runs 1-3 of bench/results/gluon_bwd_experiments_h200_2026-12-02.json ran the variant now
called ``pipelined`` (run 1: before its cross-step pipelining) from the package, behind an OVERRIDE flag."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "flash_tma"))
from harness import Rows, bench, rel  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from longreach.kernels.flash import reference as ref  # noqa: E402
from longreach.kernels.flash import triton as tk  # noqa: E402
from longreach.kernels.s2 import S2Pattern  # noqa: E402
from longreach.kernels.s2.triton import sparse_args  # noqa: E402

rows = Rows("gluon_bwd_dev1")
dev = "cuda"
gb = common.load(os.environ.get("GB_VARIANT", "ws"))


def run_bwd(gluon, do, q, k, v, out, lse, cu, S, causal, sp, pack, acc=None):
    if gluon:
        return common.backward(gb, do, q, k, v, out, lse, cu, S, causal=causal, sparse=sp, acc=acc)
    acc2 = None if acc is None else tuple(x.clone() for x in acc)
    return tk.attention_backward(do, q, k, v, out, lse, cu, cu, S, S, causal=causal, scale=q.shape[-1] ** -0.5,
                                 sparse=sp, pack=pack, acc=acc2)


def check(name, lens, hq, hkv, d, causal=True, pat=None, accumulate=False):
    do, q, k, v, out, lse, cu, _, sp, pack = common.data(lens, hq, hkv, d, pat, causal, dev)
    T = sum(lens)
    acc = None
    if accumulate:
        acc = tuple(torch.randn(T, h, d, device=dev) for h in (hq, hkv, hkv))
    allowed = (lambda doc, sq, sk: pat.token_mask(sq, hkv, device=dev)) if pat else None
    r32 = ref.attention_backward_reference(do.float(), q.float(), k.float(), v.float(), out.float(), lse, cu, cu,
                                           causal=causal, scale=d ** -0.5, allowed=allowed)
    if acc is not None:
        r32 = tuple(a + b for a, b in zip(acc, r32))
    sup = gb.supported(q, k, v, do, sp.block if sp is not None else None)
    g = run_bwd(True, do, q, k, v, out, lse, cu, max(lens), causal, sp, pack, acc)
    t = run_bwd(False, do, q, k, v, out, lse, cu, max(lens), causal, sp, pack, acc)
    torch.cuda.synchronize()
    e_g = [rel(a, b) for a, b in zip(g, r32)]
    e_t = [rel(a, b) for a, b in zip(t, r32)]
    ok = all(eg <= 2 * et + 1e-3 for eg, et in zip(e_g, e_t)) and all(torch.isfinite(x).all().item() for x in g)
    rows.rec(kind="check", name=name, gluon_used=sup, err_gluon=e_g, err_triton=e_t, ok=ok)
    return ok


if "--no-check" not in sys.argv:
    good = True
    good &= check("dense 1000", [1000], 32, 8, 128)
    good &= check("dense docs", [1000, 1900, 1196], 32, 8, 128)
    good &= check("d64 mha 777", [777], 8, 8, 64)
    good &= check("noncausal gqa2", [600, 333], 4, 2, 128, causal=False)
    good &= check("s2 3000", [3000], 32, 8, 128, pat=S2Pattern(128, 512, 128, 4))
    good &= check("s2 docs", [1500, 2100], 16, 4, 128, pat=S2Pattern(128, 256, 0, 8))
    good &= check("acc dense docs", [700, 1300], 8, 2, 128, accumulate=True)
    print("ALL OK" if good else "SOME FAILED", flush=True)

VARIANTS = [dict(DQ_BUFS=2)]  # module constants per timed variant (runs 2-3: DQ_BUFS 1/2, ABLATE 0-3)
if "--no-bench" not in sys.argv:
    hq, hkv, d = 32, 8, 128
    pat = S2Pattern(128, 2048, 128, 8)
    for S in [int(x) for x in os.environ.get("LENS", "32768,131072").split(",")]:
        cu = torch.tensor([0, S], dtype=torch.int32, device=dev)
        q = torch.randn(S, hq, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(S, hkv, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn(S, hkv, d, device=dev, dtype=torch.bfloat16)
        do = torch.randn_like(q)
        for sparse in (False, True):
            sp = sparse_args(pat, hkv, dev) if sparse else None
            pack = hq // hkv if sparse else 1
            out, lse = tk.attention_forward(q, k, v, cu, cu, S, causal=True, scale=d ** -0.5,
                                            out_dtype=torch.bfloat16, sparse=sp, pack=pack)
            fl = 2.5 * 2.0 * S * S / 2 * hq * d * (pat.density(S, hkv) if sparse else 1.0)
            res = {}
            for var in (VARIANTS if S <= 32768 else VARIANTS[:1]) + [None]:
                for kk, vv in (var or {}).items():
                    setattr(gb, kk, vv)
                gluon = var is not None
                fn = lambda: run_bwd(gluon, do, q, k, v, out, lse, cu, S, True, sp, pack)  # noqa: E731
                ms = bench(fn, rep=200 if S == 32768 else 60)
                res[gluon] = fn()
                rows.rec(kind="bench", S=S, sparse=sparse, gluon=gluon, var=var, bwd_ms=ms, tflops=2 * fl / ms / 1e9)
            gb.DQ_BUFS = 2
            rows.rec(kind="diff", S=S, sparse=sparse, rel=[rel(a, b) for a, b in zip(res[True], res[False])])
            del res
        del q, k, v, do, out, lse
        torch.cuda.empty_cache()
