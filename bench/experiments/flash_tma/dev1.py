import os, sys
import torch
sys.path.insert(0, os.path.dirname(__file__))
import fwd as pf, bwd as pb
from harness import Rows, bench, rel
from longreach.kernels.flash import triton as tk
rows = Rows("dev1")
rec = rows.rec
dev = "cuda"
hq, hkv, d = 32, 8, 128
print(torch.cuda.get_device_name(), flush=True)
for S in (32768, 131072):
    rep = 300 if S == 32768 else 100
    fl = 2.0 * S * S * hq * d  # causal fwd flops (4*S^2/2*H*D)
    cu = torch.tensor([0, S], dtype=torch.int32, device=dev)
    q = torch.randn(S, hq, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(S, hkv, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(S, hkv, d, device=dev, dtype=torch.bfloat16)
    do = torch.randn_like(q)
    sc = d ** -0.5
    f_real = lambda: tk.attention_forward(q, k, v, cu, cu, S, causal=True, scale=sc, out_dtype=torch.bfloat16)
    out, lse = f_real()
    ms = bench(f_real, rep); rec(S=S, name="real fwd", ms=ms, tf=fl / ms / 1e9)
    outp = torch.empty_like(q); lsep = torch.empty_like(lse)
    for cfg in ([dict(m=128, n=128, w=8, s=2), dict(m=128, n=128, w=8, s=3), dict(m=128, n=64, w=8, s=3),
                 dict(m=128, n=64, w=8, s=4)] if S == 32768 else [dict(m=128, n=128, w=8, s=2), dict(m=128, n=128, w=8, s=3)]):
        try:
            fn = lambda: pf.run(q=q, k=k, v=v, out=outp, lse=lsep, **cfg)
            fn(); torch.cuda.synchronize()
            err = (rel(outp, out), rel(lsep, lse))
            ms = bench(fn, rep); rec(S=S, name=f"proto fwd {cfg}", ms=ms, tf=fl / ms / 1e9, err=err)
        except Exception as e:
            rec(S=S, name=f"proto fwd {cfg}", err=str(e)[:300])
    qs, ks, vs = (x.unsqueeze(0).transpose(1, 2) for x in (q, k, v))
    from torch.nn.attention import sdpa_kernel, SDPBackend
    def cud():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
    try:
        ms = bench(cud, rep); rec(S=S, name="cudnn fwd", ms=ms, tf=fl / ms / 1e9)
    except Exception as e:
        rec(S=S, name="cudnn fwd", err=str(e)[:300])
    f_rb = lambda: tk.attention_backward(do, q, k, v, out, lse, cu, cu, S, S, causal=True, scale=sc)
    gq, gk, gv = f_rb()
    ms = bench(f_rb, rep); rec(S=S, name="real bwd", ms=ms, tf=2.5 * fl / ms / 1e9)
    delta = (out.float() * do.float()).sum(-1).t().contiguous()
    lse2 = (lse * 1.4426950408889634).contiguous()
    dq = torch.empty_like(q); dk = torch.empty_like(k); dv = torch.empty_like(v)
    cfgs = [((64, 128, 8, 3), (128, 64, 8, 3)), ((64, 128, 8, 2), (128, 64, 8, 2)), ((64, 128, 8, 4), (128, 64, 8, 4)),
            ((64, 64, 4, 3), (128, 128, 8, 2))] if S == 32768 else [((64, 128, 8, 3), (128, 64, 8, 3)), ((64, 128, 8, 2), (128, 64, 8, 2))]
    for t1, t2 in cfgs:
        try:
            fn = lambda: pb.run(q, k, v, do, lse2, delta, dq, dk, dv, t1, t2)
            fn(); torch.cuda.synchronize()
            err = (rel(dq, gq), rel(dk, gk), rel(dv, gv))
            msa = bench(lambda: pb.run(q, k, v, do, lse2, delta, dq, dk, dv, t1, t2, which=("dkdv",)), rep)
            msb = bench(lambda: pb.run(q, k, v, do, lse2, delta, dq, dk, dv, t1, t2, which=("dq",)), rep)
            rec(S=S, name=f"proto bwd {t1} {t2}", ms=msa + msb, dkdv_ms=msa, dq_ms=msb, tf=2.5 * fl / (msa + msb) / 1e9, err=err)
        except Exception as e:
            rec(S=S, name=f"proto bwd {t1} {t2}", err=str(e)[:300])
    def cudb():
        qs.requires_grad_(); ks.requires_grad_(); vs.requires_grad_()
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        o.backward(do.unsqueeze(0).transpose(1, 2))
    try:
        ms = bench(cudb, rep); rec(S=S, name="cudnn fwd+bwd", ms=ms, tf=3.5 * fl / ms / 1e9)
    except Exception as e:
        rec(S=S, name="cudnn fwd+bwd", err=str(e)[:300])
    if S == 32768:
        try:
            from torch.nn.attention.flex_attention import flex_attention, create_block_mask
            bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, 1, 1, S, S, device=dev)
            ff = torch.compile(flex_attention)
            qf, kf, vf = (x.detach().clone().requires_grad_() for x in (qs, ks, vs))
            def flexb():
                o = ff(qf, kf, vf, block_mask=bm, enable_gqa=True)
                o.backward(do.unsqueeze(0).transpose(1, 2))
            ms = bench(flexb, rep); rec(S=S, name="flex fwd+bwd", ms=ms, tf=3.5 * fl / ms / 1e9)
        except Exception as e:
            rec(S=S, name="flex fwd+bwd", err=str(e)[:300])
    del q, k, v, do, out, lse, gq, gk, gv, dq, dk, dv, outp, lsep, qs, ks, vs
    torch.cuda.empty_cache()
for r in rows:
    print(f"{r['S']:>7} {r['name']:<55} {r.get('ms', float('nan')):9.3f} ms {r.get('tf', 0) or 0:6.0f} TF/s {r.get('err', '')}")
