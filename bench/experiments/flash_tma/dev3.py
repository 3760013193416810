import os, sys
import torch
sys.path.insert(0, os.path.dirname(__file__))
import bwd as pb
from harness import Rows, bench, rel
from longreach.kernels.flash import triton as tk
rows = Rows("dev3")
rec = rows.rec
dev = "cuda"
hq, hkv, d = 32, 8, 128
S = 32768
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
ms = bench(f_rb); rec(name="real bwd", ms=ms, tf=2.5 * fl / ms / 1e9)
for t in [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 8, 3)]:
    tk.OVERRIDE.clear(); tk.OVERRIDE[("dkdv", False)] = tk.Tile(*t)
    try:
        a = f_rb(); torch.cuda.synchronize()
        ms = bench(f_rb); rec(name=f"real bwd dkdv={t}", ms=ms, tf=2.5 * fl / ms / 1e9, err=(rel(a[0], gq), rel(a[1], gk), rel(a[2], gv)))
    except Exception as e:
        rec(name=f"real bwd dkdv={t}", err=str(e)[:300])
tk.OVERRIDE.clear()
delta = (out.float() * do.float()).sum(-1).t().contiguous()
lse2 = (lse * 1.4426950408889634).contiguous()
dq = torch.empty_like(q); dk = torch.empty_like(k); dv = torch.empty_like(v)
dq32 = torch.empty(S, hq, d, device=dev, dtype=torch.float32)
ms = bench(lambda: pb.run(q, k, v, do, lse2, delta, dq, dk, dv, (64, 128, 8, 3), (128, 64, 8, 3), which=("dq",)))
rec(name="proto dq (128,64,8,3)", ms=ms)
for t1 in [(64, 128, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 8, 3)]:
    try:
        fn = lambda: pb.run(q, k, v, do, lse2, delta, dq, dk, dv, t1, which=("dkdv",))
        fn(); torch.cuda.synchronize()
        ms = bench(fn); rec(name=f"proto dkdv {t1}", ms=ms, err=(rel(dk, gk), rel(dv, gv)))
    except Exception as e:
        rec(name=f"proto dkdv {t1}", err=str(e)[:300])
for t1 in [(128, 64, 8, 2), (64, 64, 8, 2), (64, 64, 8, 3)]:
    try:
        fn = lambda: pb.run(q, k, v, do, lse2, delta, dq, dk, dv, t1, dq32=dq32)
        fn(); torch.cuda.synchronize()
        ms = bench(fn); rec(name=f"atomic bwd {t1}", ms=ms, tf=2.5 * fl / ms / 1e9, err=(rel(dq, gq), rel(dk, gk), rel(dv, gv)))
    except Exception as e:
        rec(name=f"atomic bwd {t1}", err=str(e)[:300])
for r in rows:
    print(f"{r['name']:<55} {r.get('ms', float('nan')):9.3f} ms {r.get('tf', 0) or 0:6.0f} TF/s {r.get('err', '')}")
