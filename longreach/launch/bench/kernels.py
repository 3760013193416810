"""``longreach bench kernels``: time our flash and S2 kernels against torch SDPA (cuDNN, flash) and FlexAttention
(and FlashAttention-4's CuTe kernels where the optional ``flash-attn-4`` package imports: ``fa4_peer``).

Forward and forward+backward, batch 1, causal, bf16, at the given lengths; prints a table and writes JSON.
FLOPs: causal forward 2*S^2*H*D (half of 4*S^2*H*D), forward+backward 3.5x that; S2 rows count the attended
fraction only. ``--check`` first compares the kernels with an fp32 reference on the GPU (out, lse, grads).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import platform
import statistics
import time
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)


def _bench(fn: Callable[[], None], reps_ms: int) -> float:
    """Median milliseconds (device events via triton's do_bench)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=max(reps_ms // 4, 1), rep=reps_ms, return_mode="median"))


def _inputs(s: int, hq: int, hkv: int, d: int, device, dtype=torch.bfloat16):
    g = torch.Generator(device=device).manual_seed(s)
    q = torch.randn(1, s, hq, d, device=device, dtype=dtype, generator=g)
    k = torch.randn(1, s, hkv, d, device=device, dtype=dtype, generator=g)
    v = torch.randn(1, s, hkv, d, device=device, dtype=dtype, generator=g)
    return q, k, v


def train_step(fwd: Callable[[], torch.Tensor], params: list) -> Callable[[], None]:
    """params get requires_grad -> a forward+backward step (grads reset each time, one fixed random dout)."""
    for p in params:
        p.requires_grad_(True)
    dout = torch.randn_like(fwd())

    def step():
        for p in params:
            p.grad = None
        fwd().backward(dout)

    return step


def _time_pair(fwd: Callable[[], torch.Tensor], params: list, reps_ms: int) -> tuple[float, float]:
    """(forward ms, forward+backward ms); params get requires_grad."""
    with torch.no_grad():
        t_f = _bench(lambda: fwd(), reps_ms)
    t_fb = _bench(train_step(fwd, params), reps_ms)
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    return t_f, t_fb


def _methods(s: int, hq: int, hkv: int, d: int, pattern, skip: set) -> dict:
    """name -> (forward function returning out [B, S, Hq, D] or [B, Hq, S, D], tensors needing grad, sparse?)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ...kernels import flash_attention, s2_attention

    q, k, v = _inputs(s, hq, hkv, d, "cuda")
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # [B, H, S, D]
    m: dict = {}
    m["ours_flash"] = (lambda: flash_attention(q, k, v, causal=True, return_lse=False), [q, k, v], False)
    m["ours_s2"] = (lambda: s2_attention(q, k, v, block=pattern.block, window=pattern.window, sink=pattern.sink,
                                         stride=pattern.stride, return_lse=False), [q, k, v], True)
    # SDPA: GQA via enable_gqa where the backend takes it, otherwise KV repeated outside the timed region
    krep, vrep = (x.repeat_interleave(hq // hkv, 1).contiguous() for x in (kt, vt))
    for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
        def f(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, krep, vrep, is_causal=True)
        m[name] = (f, [qt, krep, vrep], False)
    want_fa4 = not {"fa4", "fa4_s2"} <= skip
    bm_s2 = None
    if "flex" not in skip or want_fa4:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        # 3 lengths x 2 masks x grad on/off recompile flex_attention 12 times: past dynamo's default limit of 8
        # it falls back to eager flex, which materialises [S, S] scores (2 TiB at 128K: OOM in the 11-24 run)
        import torch._dynamo

        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
        flex = torch.compile(flex_attention, dynamic=False)

        def causal(b, h, qi, ki):
            return ki <= qi

        # _compile=True: the mask is built block-wise, never as a dense [H, S, S] tensor (128K would not fit)
        bm_dense = create_block_mask(causal, 1, None, s, s, device="cuda", _compile=True)
        bm_s2 = create_block_mask(pattern.flex_mask_mod(hq // hkv), 1, hq, s, s, device="cuda",
                                  BLOCK_SIZE=pattern.block, _compile=True)
        m["flex"] = (lambda: flex(qt, kt, vt, block_mask=bm_dense, enable_gqa=True), [qt, kt, vt], False)
        m["flex_s2"] = (lambda: flex(qt, kt, vt, block_mask=bm_s2, enable_gqa=True), [qt, kt, vt], True)
    if want_fa4:  # FlashAttention-4 (optional package), dense and with the same S2 block mask
        from .fa4_peer import methods as fa4_methods

        m.update(fa4_methods(q, k, v, bm_s2, pattern.block, skip))
    return {k_: v_ for k_, v_ in m.items() if k_ not in skip}


def agreement(peer, ours, params: list) -> dict:
    """A peer's out and grads against ours on the same inputs (relative norms of the differences): that it
    computes the same attention (the same mask) as the kernel it is timed against."""
    out_p, out_o = peer(), ours()
    dout = torch.randn_like(out_o)
    g_p = torch.autograd.grad(out_p, params, dout.view(out_p.shape))
    g_o = torch.autograd.grad(out_o, params, dout)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    return {"out": rel(out_p.reshape(out_o.shape), out_o), **{f"d{n}": rel(a, b) for n, a, b in zip("qkv", g_p, g_o)}}


def check(device: str = "cuda") -> list[dict]:
    """Kernel vs fp32 reference at moderate sizes on the GPU; also plain bf16 torch's error (the 2x criterion)."""
    from ...kernels import flash_attention, s2_attention
    from ...kernels.flash import flash_attention_block, flash_attention_block_backward
    from ...kernels.flash.reference import attention_reference
    from ...kernels.s2 import S2Pattern, s2_reference

    rows = []
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
    cases = [("flash", 1, 1000, 8, 2, 128, None), ("flash", 2, 777, 4, 4, 64, None),
             ("flash_docs", 1, 3000, 8, 2, 128, [0, 1000, 1001, 2500, 3000]),
             ("s2", 1, 2100, 8, 2, 128, None), ("s2_docs", 1, 3000, 8, 2, 128, [0, 1200, 3000])]
    pat = S2Pattern(block=128, window=512, sink=128, stride=3)
    for name, b, s, hq, hkv, d, docs in cases:
        q, k, v = _inputs(s, hq, hkv, d, device)
        q, k, v = (x.expand(b, -1, -1, -1).contiguous() for x in (q, k, v))
        cu = torch.tensor(docs if docs else [i * s for i in range(b + 1)], dtype=torch.int32, device=device)
        qs, ks, vs = (x.detach().reshape(-1, x.shape[2], d).float().requires_grad_() for x in (q, k, v))
        if name.startswith("s2"):
            ref_o, ref_l = s2_reference(qs, ks, vs, cu, pattern=pat, scale=d ** -0.5)
        else:
            ref_o, ref_l = attention_reference(qs, ks, vs, cu, cu, causal=True, scale=d ** -0.5)
        do = torch.randn_like(ref_o)
        ref_o.backward(do)
        # plain bf16 torch: the same reference computed in bf16
        qb, kb, vb = (x.detach().reshape(-1, x.shape[2], d).requires_grad_() for x in (q, k, v))
        if name.startswith("s2"):
            bo, _ = s2_reference(qb, kb, vb, cu, pattern=pat, scale=d ** -0.5)
        else:
            bo, _ = attention_reference(qb, kb, vb, cu, cu, causal=True, scale=d ** -0.5)
        bo.backward(do.bfloat16())
        q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
        kw = dict(cu_seqlens=cu) if docs else {}
        if name.startswith("s2"):
            o, l = s2_attention(q, k, v, block=pat.block, window=pat.window, sink=pat.sink, stride=pat.stride, **kw)
        else:
            o, l = flash_attention(q, k, v, causal=True, **kw)
        o.backward(do.view(o.shape).bfloat16())
        l = l.transpose(0, 1).reshape(hq, -1) if l.dim() == 3 else l
        row = {"case": name, "S": s, "B": b, "Hq": hq, "Hkv": hkv, "D": d,
               "out": rel(o.reshape(ref_o.shape), ref_o), "lse": rel(l, ref_l),
               "dq": rel(q.grad.reshape(qs.shape), qs.grad), "dk": rel(k.grad.reshape(ks.shape), ks.grad),
               "dv": rel(v.grad.reshape(vs.shape), vs.grad),
               "torch_bf16_out": rel(bo, ref_o), "torch_bf16_dq": rel(qb.grad, qs.grad),
               "torch_bf16_dk": rel(kb.grad, ks.grad), "torch_bf16_dv": rel(vb.grad, vs.grad)}
        rows.append(row)
        print({k_: (round(v_, 5) if isinstance(v_, float) else v_) for k_, v_ in row.items()}, flush=True)
    # block API: a 2-chunk ring by hand (diagonal + full step merged in fp32) equals the whole
    s, hq, hkv, d = 1024, 8, 2, 128
    q, k, v = _inputs(s, hq, hkv, d, device)
    h = s // 2
    o_full, l_full = flash_attention(q.float(), k.float(), v.float(), causal=True)
    o1, l1 = flash_attention_block(q[:, h:], k[:, h:], v[:, h:], mask="causal")
    o2, l2 = flash_attention_block(q[:, h:], k[:, :h], v[:, :h], mask="full")
    lse = torch.logaddexp(l1, l2)
    o = o1 * torch.exp(l1 - lse).transpose(1, 2)[..., None] + o2 * torch.exp(l2 - lse).transpose(1, 2)[..., None]
    rows.append({"case": "block_merge", "out": rel(o, o_full[:, h:]), "lse": rel(lse, l_full[:, :, h:])})
    do = torch.randn_like(o)
    g1 = flash_attention_block_backward(do, q[:, h:], k[:, h:], v[:, h:], o, lse, mask="causal")
    g2 = flash_attention_block_backward(do, q[:, h:], k[:, :h], v[:, :h], o, lse, mask="full")
    qf, kf, vf = (x.float().requires_grad_() for x in (q, k, v))
    of, _ = flash_attention(qf, kf, vf, causal=True)
    (of[:, h:] * do).sum().backward()
    rows.append({"case": "block_bwd", "dq": rel(g1[0] + g2[0], qf.grad[:, h:]),
                 "dk": rel(torch.cat([g2[1], g1[1]], 1), kf.grad), "dv": rel(torch.cat([g2[2], g1[2]], 1), vf.grad)})
    return rows


def check_sm90_forward(device: str = "cuda") -> list[dict]:
    """The Gluon sm_90 forward (kernels/flash/gluon_sm90.py) against the Triton forward and an fp32 reference, on
    the cases CI cannot run (no Hopper there): odd lengths, documents, GQA, D 64, fp16, non-causal, S2 packed and
    not, dense S2 heads, fp32 out, and the ring's accumulate mode (two kv halves merged in place)."""
    from ...kernels.flash import reference as ref
    from ...kernels.flash import triton as tk
    from ...kernels.s2 import S2Pattern
    from ...kernels.s2.triton import sparse_args

    g = tk._gluon()
    x = torch.zeros(8, 2, 128, device=device, dtype=torch.bfloat16)
    why = "no Gluon in this Triton" if g is None else g.why_not(x, x, x, None, 1)
    if why:
        return [{"case": "sm90_forward", "skipped": why}]
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
    rows = []

    def fwd(gluon: bool, *a, persist: bool = False, **kw):
        tk.OVERRIDE["gluon_fwd"] = gluon
        g.OVERRIDE_PERSIST.update({False: persist, True: persist})
        try:
            return tk.attention_forward(*a, **kw)
        finally:
            tk.OVERRIDE.pop("gluon_fwd", None)
            g.OVERRIDE_PERSIST.clear()

    cases = [  # name, doc lengths, hq, hkv, d, dtype, causal, S2 pattern, pack
        ("dense", [1000], 32, 8, 128, torch.bfloat16, True, None, 1),
        ("docs", [1000, 1900, 1196], 32, 8, 128, torch.bfloat16, True, None, 1),
        ("d64_mha_fp16", [777], 8, 8, 64, torch.float16, True, None, 1),
        ("noncausal", [600, 333], 4, 2, 128, torch.bfloat16, False, None, 1),
        ("s2_pack4", [3000], 32, 8, 128, torch.bfloat16, True, S2Pattern(128, 512, 128, 4), 4),
        ("s2_pack1", [3000], 32, 8, 128, torch.bfloat16, True, S2Pattern(128, 512, 128, 4), 1),
        ("s2_docs_dense_heads", [1500, 2100], 16, 4, 128, torch.bfloat16, True,
         S2Pattern(128, 256, 0, 8, dense_heads=(1, 2)), 4),
        ("s2_block256_gqa8", [2500], 16, 2, 128, torch.bfloat16, True, S2Pattern(256, 512, 256, 3), 8),
    ]
    for name, lens, hq, hkv, d, dt, causal, pat, pack in cases:
        torch.manual_seed(0)
        t = sum(lens)
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
        q, k, v = (torch.randn(t, h, d, device=device, dtype=dt) for h in (hq, hkv, hkv))
        sp = sparse_args(pat, hkv, device) if pat else None
        kw = dict(causal=causal, scale=d ** -0.5, out_dtype=dt, sparse=sp, pack=pack)
        go, gl_ = fwd(True, q, k, v, cu, cu, max(lens), **kw)
        po, pl = fwd(True, q, k, v, cu, cu, max(lens), persist=True, **kw)
        to, tl_ = fwd(False, q, k, v, cu, cu, max(lens), **kw)
        allowed = (lambda doc, sq, sk, pat=pat, hkv=hkv: pat.token_mask(sq, hkv, device=device)) if pat else None
        ro, rl = ref.attention_reference(q.float(), k.float(), v.float(), cu, cu, causal=causal, scale=d ** -0.5,
                                         allowed=allowed)
        r = {"case": f"sm90_{name}", "gluon_skipped": g.why_not(q, k, v, sp, pack), "out": rel(go, ro),
             "out_triton": rel(to, ro), "lse": rel(gl_, rl), "lse_triton": rel(tl_, rl), "vs_triton": rel(go, to),
             "persist_vs_not": max((po.float() - go.float()).abs().max().item(), (pl - gl_).abs().max().item())}
        r["ok"] = r["gluon_skipped"] is None and r["out"] <= 2 * r["out_triton"] + 1e-3 and r["lse"] <= 1e-4 and \
            r["persist_vs_not"] == 0.0
        rows.append(r)
    # a q document whose kv document is empty (non-causal ring step): its rows get out 0, lse -inf
    torch.manual_seed(2)
    cu_q = torch.tensor([0, 600, 933], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 500, 500], dtype=torch.int32, device=device)
    q = torch.randn(933, 8, 128, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(500, 2, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
    res = {}
    for persist in (False, True):
        o = torch.full_like(q, 7.0)
        lse = torch.zeros(8, 933, device=device)
        res[persist] = fwd(True, q, k, v, cu_q, cu_k, 600, causal=False, scale=128 ** -0.5, out_dtype=q.dtype,
                           out=o, lse=lse, persist=persist)
    ro, rl = ref.attention_reference(q.float(), k.float(), v.float(), cu_q, cu_k, causal=False, scale=128 ** -0.5)
    r = {"case": "sm90_empty_kv_doc", "out": rel(res[False][0][:600], ro[:600]),
         "out_persist": rel(res[True][0][:600], ro[:600]),
         "empty_rows_ok": all(bool((x[0][600:] == 0).all()) and bool(torch.isneginf(x[1][:, 600:]).all())
                              for x in res.values())}
    r["ok"] = r["empty_rows_ok"] and max(r["out"], r["out_persist"]) <= 1e-2
    rows.append(r)
    # ring hops: diagonal block then the earlier kv half, merged into fp32 (out, lse) in place, vs the whole
    torch.manual_seed(1)
    s, hq, hkv, d = 1536, 8, 2, 128
    q, k, v = (torch.randn(s, h, d, device=device, dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    h = 640
    cu_h = torch.tensor([0, s - h], dtype=torch.int32, device=device)
    cu_e = torch.tensor([0, h], dtype=torch.int32, device=device)
    res = {}
    for gluon, persist in ((True, False), (False, False), ("persist", True)):
        o = torch.zeros(s - h, hq, d, device=device)
        lse = torch.full((hq, s - h), float("-inf"), device=device)
        fwd(bool(gluon), q[h:], k[h:], v[h:], cu_h, cu_h, s - h, causal=True, scale=d ** -0.5,
            out_dtype=torch.float32, out=o, lse=lse, accumulate=True, persist=persist)
        fwd(bool(gluon), q[h:], k[:h], v[:h], cu_h, cu_e, s - h, causal=False, scale=d ** -0.5,
            out_dtype=torch.float32, out=o, lse=lse, accumulate=True, persist=persist)
        res[gluon] = (o, lse)
    cu = torch.tensor([0, s], dtype=torch.int32, device=device)
    ro, rl = ref.attention_reference(q.float(), k.float(), v.float(), cu, cu, causal=True, scale=d ** -0.5)
    r = {"case": "sm90_ring_accumulate", "out": rel(res[True][0], ro[h:]), "out_triton": rel(res[False][0], ro[h:]),
         "lse": rel(res[True][1], rl[:, h:]), "lse_triton": rel(res[False][1], rl[:, h:]),
         "vs_triton": rel(res[True][0], res[False][0]),
         "persist_vs_not": (res["persist"][0] - res[True][0]).abs().max().item()}
    r["ok"] = r["out"] <= 2 * r["out_triton"] + 1e-3 and r["lse"] <= 1e-4 and r["persist_vs_not"] == 0.0
    rows.append(r)
    r = {"case": "sm90_launch_errors", "ok": not g._BROKEN, "errors": list(g._BROKEN)}
    rows.append(r)
    for r in rows:
        print({k_: (round(v_, 6) if isinstance(v_, float) else v_) for k_, v_ in r.items()}, flush=True)
    return rows


def check_sm90_backward(device: str = "cuda") -> list[dict]:
    """The backward with the Gluon sm_90 dk/dv kernel (kernels/flash/gluon_sm90_bwd.py) against the all-Triton
    backward and an fp32 reference: odd lengths, documents, GQA, D 64, fp16, non-causal with q and k documents of
    different lengths, S2 with dense heads and block 256, fp32 grads, and the ring's accumulate mode (two kv halves
    added into fp32 dq/dk/dv in place)."""
    from ...kernels.flash import reference as ref
    from ...kernels.flash import triton as tk
    from ...kernels.s2 import S2Pattern
    from ...kernels.s2.triton import sparse_args

    g = tk._gluon("gluon_sm90_bwd")
    x = torch.zeros(8, 2, 128, device=device, dtype=torch.bfloat16)
    why = "no Gluon in this Triton" if g is None else g.why_not(x, x, x, x, torch.zeros(2, 8, device=device), None)
    if why:
        return [{"case": "sm90_backward", "skipped": why}]
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
    rows = []

    def bwd(gluon, *a, **kw):  # gluon: False (all Triton), True (Gluon dk/dv + Triton dq), "atomic" (dq in dk/dv),
        # "chunked" (dq in dk/dv, the q rows in chunks of 256 as for a long sequence), S2 only: "s2_chunked" /
        # "s2_chunked_hybrid" (S2_BWD_CHUNK = 256, with / without the dq in dk/dv)
        tk.OVERRIDE["gluon_bwd"] = bool(gluon)
        tk.OVERRIDE["gluon_atomic_dq"] = gluon in ("atomic", "chunked", "s2_chunked")
        if gluon in ("s2_chunked", "s2_chunked_hybrid"):
            tk.OVERRIDE["s2_chunk"] = 256
        max_bytes = tk.FUSED_DQ_MAX_BYTES
        if gluon == "chunked":
            tk.FUSED_DQ_MAX_BYTES = 256 * a[1].shape[1] * a[1].shape[2] * 4
        try:
            return tk.attention_backward(*a, **kw)
        finally:
            for key in ("gluon_bwd", "gluon_atomic_dq", "s2_chunk"):
                tk.OVERRIDE.pop(key, None)
            tk.FUSED_DQ_MAX_BYTES = max_bytes

    cases = [  # name, q doc lengths, k doc lengths, hq, hkv, d, dtype, causal, S2 pattern, grad dtype
        ("dense", [1000], None, 32, 8, 128, torch.bfloat16, True, None, None),
        ("docs", [1000, 1900, 1196], None, 32, 8, 128, torch.bfloat16, True, None, None),
        ("d64_mha_fp16", [777], None, 8, 8, 64, torch.float16, True, None, None),
        ("noncausal_qk_lengths", [600, 333], [250, 901], 4, 2, 128, torch.bfloat16, False, None, None),
        ("causal_fp32_grads", [1300], None, 8, 2, 128, torch.bfloat16, True, None, torch.float32),
        ("s2", [3000], None, 32, 8, 128, torch.bfloat16, True, S2Pattern(128, 512, 128, 4), None),
        ("s2_docs_dense_heads", [1500, 2100], None, 16, 4, 128, torch.bfloat16, True,
         S2Pattern(128, 256, 0, 8, dense_heads=(1, 2)), None),
        ("s2_block256_gqa8", [2500], None, 16, 2, 128, torch.bfloat16, True, S2Pattern(256, 512, 256, 3), None),
    ]
    for name, lq, lk, hq, hkv, d, dt, causal, pat, gdt in cases:
        torch.manual_seed(0)
        lk = lk or lq
        cu_q = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32, device=device)
        cu_k = torch.tensor([0] + list(torch.tensor(lk).cumsum(0)), dtype=torch.int32, device=device)
        q = torch.randn(sum(lq), hq, d, device=device, dtype=dt)
        k, v = (torch.randn(sum(lk), hkv, d, device=device, dtype=dt) for _ in range(2))
        sp = sparse_args(pat, hkv, device) if pat else None
        pack = hq // hkv if pat else 1
        sc = d ** -0.5
        out, lse = tk.attention_forward(q, k, v, cu_q, cu_k, max(lq), causal=causal, scale=sc, out_dtype=dt,
                                        sparse=sp, pack=pack)
        do = torch.randn_like(q)
        kw = dict(causal=causal, scale=sc, sparse=sp, pack=pack, grad_dtype=gdt)
        tg = bwd(False, do, q, k, v, out, lse, cu_q, cu_k, max(lq), max(lk), **kw)
        qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
        allowed = (lambda doc, sq, sk, pat=pat, hkv=hkv: pat.token_mask(sq, hkv, device=device)) if pat else None
        ro, _ = ref.attention_reference(qf, kf, vf, cu_q, cu_k, causal=causal, scale=sc, allowed=allowed)
        ro.backward(do.float())
        for mode in (True, "atomic", "chunked") + (("s2_chunked", "s2_chunked_hybrid") if pat else ()):
            gg = bwd(mode, do, q, k, v, out, lse, cu_q, cu_k, max(lq), max(lk), **kw)
            suffix = {True: "", "atomic": "_atomic_dq", "chunked": "_chunked_dq", "s2_chunked": "_s2_chunks",
                      "s2_chunked_hybrid": "_s2_chunks_hybrid"}[mode]
            r = {"case": f"sm90_bwd_{name}{suffix}",
                 "gluon_skipped": g.why_not(q, k, v, do, lse, sp)}
            for n_, a, b, ref_ in zip(("dq", "dk", "dv"), gg, tg, (qf.grad, kf.grad, vf.grad)):
                r[n_], r[f"{n_}_triton"], r[f"{n_}_vs_triton"] = rel(a, ref_), rel(b, ref_), rel(a, b)
            r["ok"] = r["gluon_skipped"] is None and all(r[n_] <= 2 * r[f"{n_}_triton"] + 1e-3
                                                         for n_ in ("dq", "dk", "dv"))
            r["ok"] = r["ok"] and all(x.dtype == (gdt or dt) for x in gg)
            rows.append(r)
    # ring hops: the diagonal block, then the earlier kv half, both added into fp32 dq/dk/dv, vs the whole
    torch.manual_seed(1)
    s, hq, hkv, d = 1536, 8, 2, 128
    q, k, v = (torch.randn(s, h, d, device=device, dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    h = 640
    cu = torch.tensor([0, s], dtype=torch.int32, device=device)
    cu_h = torch.tensor([0, s - h], dtype=torch.int32, device=device)
    cu_e = torch.tensor([0, h], dtype=torch.int32, device=device)
    out, lse = tk.attention_forward(q, k, v, cu, cu, s, causal=True, scale=d ** -0.5, out_dtype=torch.bfloat16)
    do = torch.randn_like(q)
    o2, l2 = out[h:], lse[:, h:]
    res = {}
    for gluon in (True, "atomic", "chunked", False):
        dq = torch.zeros(s - h, hq, d, device=device)
        dk, dv = torch.zeros(s, hkv, d, device=device), torch.zeros(s, hkv, d, device=device)
        bwd(gluon, do[h:], q[h:], k[h:], v[h:], o2, l2, cu_h, cu_h, s - h, s - h, causal=True, scale=d ** -0.5,
            acc=(dq, dk[h:], dv[h:]))
        bwd(gluon, do[h:], q[h:], k[:h], v[:h], o2, l2, cu_h, cu_e, s - h, h, causal=False, scale=d ** -0.5,
            acc=(dq, dk[:h], dv[:h]))
        res[gluon] = (dq, dk, dv)
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    ro, _ = ref.attention_reference(qf, kf, vf, cu, cu, causal=True, scale=d ** -0.5)
    (ro[h:] * do[h:].float()).sum().backward()
    for mode in (True, "atomic", "chunked"):
        r = {"case": "sm90_bwd_ring_accumulate" + {True: "", "atomic": "_atomic_dq", "chunked": "_chunked_dq"}[mode]}
        for i, (n_, ref_) in enumerate(zip(("dq", "dk", "dv"), (qf.grad[h:], kf.grad, vf.grad))):
            r[n_], r[f"{n_}_triton"] = rel(res[mode][i], ref_), rel(res[False][i], ref_)
        r["ok"] = all(r[n_] <= 2 * r[f"{n_}_triton"] + 1e-3 for n_ in ("dq", "dk", "dv"))
        rows.append(r)
    rows.append({"case": "sm90_bwd_launch_errors", "ok": not g._BROKEN, "errors": list(g._BROKEN)})
    for r in rows:
        print({k_: (round(v_, 6) if isinstance(v_, float) else v_) for k_, v_ in r.items()}, flush=True)
    return rows


def _median_rows(rows: list[dict]) -> list[dict]:
    """One row per method: the median over its rounds of each time (``round`` = "median")."""
    out = []
    for name in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == name]
        row = {**rs[0], "round": "median", "rounds": len(rs)}
        for k in ("fwd_ms", "fwdbwd_ms"):
            row[k] = statistics.median(r[k] for r in rs)
        f = rs[0]["fwd_tflops"] * rs[0]["fwd_ms"] if rs[0]["fwd_tflops"] else None  # flops / 1e9
        row["fwd_tflops"] = f / row["fwd_ms"] if f and row["fwd_ms"] == row["fwd_ms"] else None
        row["fwdbwd_tflops"] = 3.5 * f / row["fwdbwd_ms"] if f and row["fwdbwd_ms"] == row["fwdbwd_ms"] else None
        row.pop("vs_ours", None)
        out.append(row)
    return out


def _print_row(s: int, name: str, t_f: float, t_fb: float, row: dict, tag: str = "") -> None:
    print(f"{s:>7} {name:<11} fwd {t_f:9.2f} ms {row['fwd_tflops'] or 0:6.0f} TF/s   "
          f"fwd+bwd {t_fb:9.2f} ms {row['fwdbwd_tflops'] or 0:6.0f} TF/s{tag}", flush=True)


def run(seqlens: list[int], hq: int, hkv: int, d: int, reps_ms: int, skip: set, pattern,
        on_row: Callable[[list], None] = lambda rows: None, rounds: int = 1) -> list[dict]:
    """Time every method at every length; ``on_row(results)`` after each row (the JSON is written as we go).
    ``rounds`` > 1: the methods one after another, that many times over (a power-capped GPU's clock drifts over a
    run; alternating compares the methods at the same clocks), then a median row per method."""
    results = []
    for s in seqlens:
        flops_fwd = 2.0 * s * s * hq * d  # causal: half of 4*S^2*H*D
        dens = pattern.density(s, hkv)
        methods = _methods(s, hq, hkv, d, pattern, skip)
        this_len = []
        for rnd, name in ((r, n) for r in range(rounds) for n in methods):
            fwd, params, sparse = methods[name]
            t0 = time.time()
            agree = None
            try:
                ours = methods.get("ours_s2" if sparse else "ours_flash")
                if rnd == 0 and name.startswith("fa4") and ours is not None:  # the peer against ours (and compile)
                    for p in params:
                        p.requires_grad_(True)
                    agree = agreement(fwd, ours[0], params)
                    for p in params:
                        p.requires_grad_(False)
                t_f, t_fb = _time_pair(fwd, params, reps_ms)
                err = None
            except Exception as e:  # a baseline that does not run here is reported, not fatal
                t_f = t_fb = math.nan
                err = f"{type(e).__name__}: {str(e)[:200]}"
            f = flops_fwd * (dens if sparse else 1.0)
            row = {"method": name, "seqlen": s, "sparse": sparse, "fwd_ms": t_f, "fwdbwd_ms": t_fb,
                   "fwd_tflops": f / t_f / 1e9 if t_f == t_f else None,
                   "fwdbwd_tflops": 3.5 * f / t_fb / 1e9 if t_fb == t_fb else None,
                   "density": dens if sparse else 1.0, "error": err, "wall_s": time.time() - t0}
            if agree is not None:
                row["vs_ours"] = agree
            if rounds > 1:
                row["round"] = rnd
            results.append(row)
            this_len.append(row)
            on_row(results)
            _print_row(s, name, t_f, t_fb, row, (f"  {err}" if err else "") + (f"  round {rnd}" if rounds > 1 else "") +
                       (f"  vs ours {({k_: round(v_, 4) for k_, v_ in agree.items()})}" if agree else ""))
        if rounds > 1:
            for row in _median_rows(this_len):
                results.append(row)
                _print_row(s, row["method"], row["fwd_ms"], row["fwdbwd_ms"], row, f"  median of {rounds} rounds")
            on_row(results)
        del methods
        torch.cuda.empty_cache()
    return results


def main(argv: Optional[list[str]] = None) -> int:
    from ...kernels.s2 import S2Pattern

    ap = argparse.ArgumentParser(prog="longreach bench kernels", description=__doc__)
    ap.add_argument("--seqlens", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps-ms", type=int, default=200, help="timed milliseconds per measurement (median)")
    ap.add_argument("--skip", nargs="*", default=[], help="methods to skip (e.g. flex sdpa_flash)")
    ap.add_argument("--rounds", type=int, default=1, help="time the methods in turn this many times (median row)")
    ap.add_argument("--check", action="store_true", help="first compare the kernels with an fp32 reference")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--sink", type=int, default=128)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--json", default="bench_kernels.json", help="output JSON path")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("longreach bench kernels needs a CUDA GPU (none found)")
    pattern = S2Pattern(a.block, a.window, a.sink, a.stride)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
              "config": vars(a), "pattern": dataclasses.asdict(pattern)}
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        pass
    try:  # the optional FlashAttention-4 peer
        from importlib.metadata import version

        report["flash_attn_4"] = version("flash-attn-4")
        report["nvidia_cutlass_dsl"] = version("nvidia-cutlass-dsl")
    except Exception:
        pass
    if a.check:
        try:
            report["check"] = check() + check_sm90_forward() + check_sm90_backward()
            for r in report["check"][-2:]:
                print({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
        except Exception as e:  # a failed check is reported in the JSON; the timings still run
            report["check"] = [{"error": f"{type(e).__name__}: {str(e)[:500]}"}]
            print("check failed:", report["check"][0]["error"], flush=True)

    def write(rows=None):
        if rows is not None:
            report["results"] = rows
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1, default=str)

    if not a.no_bench:
        if a.rounds < 1:
            raise SystemExit(f"--rounds must be at least 1 (got {a.rounds})")
        run(a.seqlens, a.heads, a.kv_heads, a.head_dim, a.reps_ms, set(a.skip), pattern, on_row=write,
            rounds=a.rounds)
    write()
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
