"""GPU check and timing of the Gluon dK/dV kernel (now longreach/kernels/flash/gluon_sm90_bwd.py) against the Triton backward's dk/dv kernel and an fp32
reference. PYTHONPATH=. python bench/experiments/gluon_dkdv/dev.py  (writes $OUT/gluon_dkdv_dev.json;
LENS=32768,131072; CONFIGS="4,1,0 4,0,0 2,1,0 4,1,1" = STAGES,PINGPONG,WAIT_DV)

Timed, backward only, B1 Hq32 Hkv8 D128 causal bf16, dense and S2 (block 128, window 2048, sink 128, stride 8):
the full Triton backward; its delta + dk/dv kernel alone and delta + dq kernel alone (the other one skipped at
launch); the Gluon prep + dk/dv; and the hybrid (Gluon prep + dk/dv, then Triton delta + dq)."""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "flash_tma"))
from harness import Rows, bench, rel  # noqa: E402
from longreach.kernels.flash import reference as ref  # noqa: E402
from longreach.kernels.flash import triton as tk  # noqa: E402
from longreach.kernels.s2 import S2Pattern  # noqa: E402
from longreach.kernels.s2.triton import sparse_args  # noqa: E402

g_mod = tk._gluon("gluon_sm90_bwd")


class dkdv_ws:  # the experiment's former module API over the package kernel
    prep = staticmethod(g_mod.prep)

    @staticmethod
    def dkdv(do, q, k, v, delta, lse2, cu_q, cu_k, max_k, *, causal, scale, dk=None, dv=None, accumulate=False,
             sparse=None):
        dk = torch.empty_like(k) if dk is None else dk
        dv = torch.empty_like(v) if dv is None else dv
        dense, sp = tk._sparse_args(sparse, q.device)
        for n in ("STAGES", "PINGPONG", "WAIT_DV"):
            setattr(g_mod, n, getattr(dkdv_ws, n))
        assert g_mod.dkdv_into(do, q, k, v, delta, lse2, cu_q, cu_k, max_k, dense, sp, dk, dv, causal=causal,
                               scale=scale, sparse=sparse is not None, accumulate=accumulate)
        return dk, dv


dkdv_ws.STAGES, dkdv_ws.PINGPONG, dkdv_ws.WAIT_DV = g_mod.STAGES, g_mod.PINGPONG, g_mod.WAIT_DV

rows = Rows(os.environ.get("NAME", "gluon_dkdv_dev"))
dev = "cuda"
_orig_run = tk._run


def only(name):
    """tk._run that launches only ``name`` of the two backward kernels (the delta kernel always runs)."""
    def run(kernel, *a, **k):
        n = kernel.fn.__name__
        if n in ("_attn_bwd_dkdv", "_attn_bwd_dq") and n != name:
            return None
        return _orig_run(kernel, *a, **k)
    return run


def setup(lens, hq, hkv, d, causal, pat, seed=0):
    torch.manual_seed(seed)
    t = sum(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=dev)
    q, k, v = (torch.randn(t, h, d, device=dev, dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    sp = sparse_args(pat, hkv, dev) if pat else None
    pack = hq // hkv if pat else 1
    out, lse = tk.attention_forward(q, k, v, cu, cu, max(lens), causal=causal, scale=d ** -0.5, out_dtype=q.dtype,
                                    sparse=sp, pack=pack)
    do = torch.randn_like(q)
    return q, k, v, cu, sp, pack, out, lse, do


def check(name, lens, hq, hkv, d, causal=True, pat=None, acc=False):
    q, k, v, cu, sp, pack, out, lse, do = setup(lens, hq, hkv, d, causal, pat)
    ml = max(lens)
    delta, lse2 = dkdv_ws.prep(do, out, lse)
    if acc:
        dk0, dv0 = torch.randn(k.shape, device=dev), torch.randn(v.shape, device=dev)
        gdk, gdv = dkdv_ws.dkdv(do, q, k, v, delta, lse2, cu, cu, ml, causal=causal, scale=d ** -0.5,
                                dk=dk0.clone(), dv=dv0.clone(), accumulate=True, sparse=sp)
        gdk, gdv = gdk - dk0, gdv - dv0
    else:
        gdk, gdv = dkdv_ws.dkdv(do, q, k, v, delta, lse2, cu, cu, ml, causal=causal, scale=d ** -0.5, sparse=sp)
    _, tdk, tdv = tk.attention_backward(do, q, k, v, out, lse, cu, cu, ml, ml, causal=causal, scale=d ** -0.5,
                                        sparse=sp, pack=pack)
    qf, kf, vf = (x.float().requires_grad_() for x in (q, k, v))
    allowed = (lambda doc, sq, sk: pat.token_mask(sq, hkv, device=dev)) if pat else None
    ro, _ = ref.attention_reference(qf, kf, vf, cu, cu, causal=causal, scale=d ** -0.5, allowed=allowed)
    ro.backward(do.float())
    e = dict(dk_gluon=rel(gdk, kf.grad), dk_triton=rel(tdk, kf.grad), dv_gluon=rel(gdv, vf.grad),
             dv_triton=rel(tdv, vf.grad), dk_vs_triton=rel(gdk, tdk), dv_vs_triton=rel(gdv, tdv))
    ok = e["dk_gluon"] <= 2 * e["dk_triton"] + 1e-3 and e["dv_gluon"] <= 2 * e["dv_triton"] + 1e-3
    rows.rec(kind="check", name=name, acc=acc, ok=ok, **e)
    return ok


good = True
good &= check("dense 1000", [1000], 32, 8, 128)
good &= check("dense docs", [1000, 1900, 1196], 32, 8, 128)
good &= check("d64 mha 777", [777], 8, 8, 64)
good &= check("noncausal docs", [600, 333], 4, 2, 128, causal=False)
good &= check("s2 3000", [3000], 32, 8, 128, pat=S2Pattern(128, 512, 128, 4))
good &= check("s2 docs dense heads", [1500, 2100], 16, 4, 128, pat=S2Pattern(128, 256, 0, 8, dense_heads=(1, 2)))
good &= check("accumulate docs", [1000, 1300], 8, 2, 128, acc=True)
print("ALL OK" if good else "SOME FAILED", flush=True)
configs = [tuple(int(x) for x in c.split(",")) for c in os.environ.get("CONFIGS", "4,1,0 4,0,0 2,1,0 4,1,1").split()]
hq, hkv, d = 32, 8, 128
for S in [int(x) for x in os.environ.get("LENS", "32768,131072").split(",")]:
    for pat in (None, S2Pattern(128, 2048, 128, 8)):
        q, k, v, cu, sp, pack, out, lse, do = setup([S], hq, hkv, d, True, pat)
        bwd = lambda: tk.attention_backward(do, q, k, v, out, lse, cu, cu, S, S, causal=True,  # noqa: E731
                                            scale=d ** -0.5, sparse=sp, pack=pack)
        t_full = bench(bwd)
        tk._run = only("_attn_bwd_dkdv")
        t_dkdv = bench(bwd)
        tk._run = only("_attn_bwd_dq")
        t_dq = bench(bwd)
        tk._run = _orig_run
        _, tdk, tdv = bwd()
        for stages, pingpong, wait_dv in configs:
            dkdv_ws.STAGES, dkdv_ws.PINGPONG, dkdv_ws.WAIT_DV = stages, pingpong, wait_dv

            def g():
                delta, lse2 = dkdv_ws.prep(do, out, lse)
                return dkdv_ws.dkdv(do, q, k, v, delta, lse2, cu, cu, S, causal=True, scale=d ** -0.5, sparse=sp)

            t_g = bench(g)
            gdk, gdv = g()
            rows.rec(kind="bench", S=S, s2=pat is not None, stages=stages, pingpong=pingpong, wait_dv=wait_dv,
                     triton_bwd_ms=t_full, triton_delta_dkdv_ms=t_dkdv, triton_delta_dq_ms=t_dq, gluon_dkdv_ms=t_g,
                     hybrid_bwd_est_ms=t_g + t_dq, dk_vs_triton=rel(gdk, tdk), dv_vs_triton=rel(gdv, tdv))
        del q, k, v, out, lse, do
        torch.cuda.empty_cache()
