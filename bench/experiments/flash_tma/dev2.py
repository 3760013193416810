import os, sys
import torch
sys.path.insert(0, os.path.dirname(__file__))
import bwd as pb
from harness import Rows, bench, rel
from longreach.kernels.flash import triton as tk
rows = Rows("dev2")
rec = rows.rec
dev = "cuda"
hq, hkv, d = 32, 8, 128
for S in (32768, 131072):
    rep = 300 if S == 32768 else 100
    fl = 2.0 * S * S * hq * d
    cu = torch.tensor([0, S], dtype=torch.int32, device=dev)
    q = torch.randn(S, hq, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(S, hkv, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(S, hkv, d, device=dev, dtype=torch.bfloat16)
    do = torch.randn_like(q)
    sc = d ** -0.5
    out, lse = tk.attention_forward(q, k, v, cu, cu, S, causal=True, scale=sc, out_dtype=torch.bfloat16)
    f_rb = lambda: tk.attention_backward(do, q, k, v, out, lse, cu, cu, S, S, causal=True, scale=sc)
    gq, gk, gv = f_rb()
    ms = bench(f_rb, rep); rec(S=S, name="real bwd", ms=ms, tf=2.5 * fl / ms / 1e9)
    delta = (out.float() * do.float()).sum(-1).t().contiguous()
    lse2 = (lse * 1.4426950408889634).contiguous()
    dq = torch.empty_like(q); dk = torch.empty_like(k); dv = torch.empty_like(v)
    dq32 = torch.empty(S, hq, d, device=dev, dtype=torch.float32)
    cfgs = [(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 8, 2), (32, 128, 8, 3), (64, 64, 4, 2), (64, 64, 4, 3)]
    if S != 32768:
        cfgs = cfgs[:3]
    for t1 in cfgs:
        try:
            fn = lambda: pb.run(q, k, v, do, lse2, delta, dq, dk, dv, t1, dq32=dq32)
            fn(); torch.cuda.synchronize()
            err = (rel(dq, gq), rel(dk, gk), rel(dv, gv))
            ms = bench(fn, rep)
            rec(S=S, name=f"atomic bwd {t1}", ms=ms, tf=2.5 * fl / ms / 1e9, err=err)
        except Exception as e:
            rec(S=S, name=f"atomic bwd {t1}", err=str(e)[:300])
    del q, k, v, do, out, lse, gq, gk, gv, dq, dk, dv, dq32
    torch.cuda.empty_cache()
for r in rows:
    print(f"{r['S']:>7} {r['name']:<55} {r.get('ms', float('nan')):9.3f} ms {r.get('tf', 0) or 0:6.0f} TF/s {r.get('err', '')}")
