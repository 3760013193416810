"""Fused LoLCATs hybrid in Triton: sliding-window softmax + linear attention over everything older, in one
pass per query tile, forward and backward. The maths is ``hybrid.py``'s (the torch definition, which the
tests compare against); this file only computes it faster.

For query tile n (BT = 64 tokens) only the key tiles n-L .. n are visited explicitly, L = ceil((W-1)/BT)
(L = 1 for the default W = 64): they hold every window key of the tile and the youngest linear keys, split
by masks (window: t-W < j <= t; linear: j <= t-W). Everything older than tile n-L enters through the
chunk-boundary state h[n-L] = sum_{j < (n-L)BT} phi(k_j) v_j^T (and z), from the linear kernel's ``_fwd_h``.

forward   _fwd_h      chunk states h, z of the unshifted phi(k) v stream (``triton.py``)
          _hyb_fwd    per (query tile, query head): pass 1 the window row max m and its argmax, pass 2
                      num = phi(q) h + sum (P + A) v, den likewise; writes out = num / (den + eps) (or num)
backward  _hyb_bwd_q  per (query tile, query head): dnum = do/(den+eps), dden = -<do,o>/(den+eps) (or the
                      given ones), dq, dphi(q), delta = sum_window P dP (the row max's gradient)
          _bwd_dh     reverse scan of the state gradients with lag L (``triton.py``)
          _hyb_bwd_kv per (key tile, KV head), looping over the query tiles n..n+L and the query heads of
                      the group: dk, dv, dphi(k)

Row max gradient: m = max_window s is differentiable (as in the torch path): d s_j gets P_j dP_j and the
argmax position additionally gets -delta = -sum_i P_i dP_i (dm; non-zero because the linear term is not
rescaled by exp(-m)). Ties: the first maximal key takes all of dm (torch splits it evenly; ties have
measure zero for real data). Under TRITON_INTERPRET=1 the dots run in fp32 (see ``triton.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton import BT, _blocks, _bwd_dh, _dot, _f32, _fwd_h, _pow2


# launch options per kernel, from a sweep of num_warps {4, 8} x num_stages {1, 2} on an H100 (S = 32K, 32 heads,
# D = F = V = 128, bf16; ms per variant in bench/results/linear_window_tune_h100_2026-11-24.json): the three [64, 128] fp32
# accumulators of _hyb_bwd_kv want 8 warps, the others run best on 4
LAUNCH = {"fwd": dict(num_warps=4, num_stages=1), "bwd_q": dict(num_warps=4, num_stages=1),
          "bwd_kv": dict(num_warps=8, num_stages=1)}


def lag(window: int) -> int:
    """Key tiles before the query tile that the window can reach: ceil((W - 1) / BT)."""
    return -(-(window - 1) // BT)


@triton.jit
def _masks(tt, ss, mt, ms, W: tl.constexpr):
    # [query rows, key cols]: window t-W < j <= t, linear j <= t-W, both inside the sequence
    ok = mt[:, None] & ms[None, :]
    win = ok & (ss[None, :] <= tt[:, None]) & (ss[None, :] > tt[:, None] - W)
    lin = ok & (ss[None, :] <= tt[:, None] - W)
    return win, lin


@triton.jit
def _hyb_fwd(q, k, v, fq, fk, h, zb, o, den, mrow, irow, scale, eps, T, NT,
             HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, V: tl.constexpr, F: tl.constexpr,
             BD: tl.constexpr, BV: tl.constexpr, BF: tl.constexpr, BT: tl.constexpr, W: tl.constexpr,
             L: tl.constexpr, NORM: tl.constexpr, F32: tl.constexpr):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    HKV: tl.constexpr = HQ // G
    b = (i_bh // HQ).to(tl.int64)
    hq = i_bh % HQ
    hk = hq // G
    ot = tl.arange(0, BT)
    tt = i_t * BT + ot
    mt = tt < T
    od, ov, of = tl.arange(0, BD), tl.arange(0, BV), tl.arange(0, BF)
    md, mv, mf = od < D, ov < V, of < F
    qrow = (b * T + tt) * HQ + hq
    qb = tl.load(q + qrow[:, None] * D + od[None, :], mask=mt[:, None] & md[None, :], other=0.0)
    fqb = tl.load(fq + qrow[:, None] * F + of[None, :], mask=mt[:, None] & mf[None, :], other=0.0)
    lo = tl.maximum(i_t - L, 0)
    # pass 1: the window's row max (and where it is, for the backward)
    m = tl.full([BT], float("-inf"), tl.float32)
    idx = tl.zeros([BT], tl.int32)
    for j in range(lo, i_t + 1):
        ss = j * BT + ot
        ms = ss < T
        krow = (b * T + ss) * HKV + hk
        kb = tl.load(k + krow[:, None] * D + od[None, :], mask=ms[:, None] & md[None, :], other=0.0)
        win, lin = _masks(tt, ss, mt, ms, W)
        s = tl.where(win, _dot(qb, tl.trans(kb), F32) * scale, float("-inf"))
        tmax = tl.max(s, 1)
        targ = tl.argmax(s, 1)
        upd = tmax > m
        idx = tl.where(upd, j * BT + targ, idx)
        m = tl.where(upd, tmax, m)
    # pass 2: the state of everything older than tile lo, then the explicit tiles (window + linear)
    hoff = ((b * NT + lo) * HKV + hk) * F * V
    hb = tl.load(h + hoff + of[:, None] * V + ov[None, :], mask=mf[:, None] & mv[None, :], other=0.0)
    acc = _dot(fqb, hb, F32)
    zv = tl.load(zb + ((b * NT + lo) * HKV + hk) * F + of, mask=mf, other=0.0)
    dsum = tl.sum(fqb.to(tl.float32) * zv[None, :], 1)
    for j in range(lo, i_t + 1):
        ss = j * BT + ot
        ms = ss < T
        krow = (b * T + ss) * HKV + hk
        kb = tl.load(k + krow[:, None] * D + od[None, :], mask=ms[:, None] & md[None, :], other=0.0)
        fkb = tl.load(fk + krow[:, None] * F + of[None, :], mask=ms[:, None] & mf[None, :], other=0.0)
        vb = tl.load(v + krow[:, None] * V + ov[None, :], mask=ms[:, None] & mv[None, :], other=0.0)
        win, lin = _masks(tt, ss, mt, ms, W)
        s = _dot(qb, tl.trans(kb), F32) * scale
        p = tl.where(win, tl.exp(s - m[:, None]), 0.0)
        a = tl.where(lin, _dot(fqb, tl.trans(fkb), F32), 0.0)
        c = p + a  # disjoint masks: one product with v serves both terms
        acc += _dot(c.to(vb.dtype), vb, F32)
        dsum += tl.sum(c, 1)
    if NORM:
        acc = acc / (dsum + eps)[:, None]
    tl.store(o + qrow[:, None] * V + ov[None, :], acc.to(o.dtype.element_ty), mask=mt[:, None] & mv[None, :])
    rrow = (b * T + tt) * HQ + hq
    tl.store(den + rrow, dsum, mask=mt)
    tl.store(mrow + rrow, m, mask=mt)
    tl.store(irow + rrow, idx, mask=mt)


@triton.jit
def _hyb_bwd_q(q, k, v, fq, fk, h, zb, o, den, mrow, irow, do, dden_in, dnum_out, dden_out, delta_out,
               dq, dfq, scale, eps, T, NT,
               HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, V: tl.constexpr, F: tl.constexpr,
               BD: tl.constexpr, BV: tl.constexpr, BF: tl.constexpr, BT: tl.constexpr, W: tl.constexpr,
               L: tl.constexpr, NORM: tl.constexpr, F32: tl.constexpr):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    HKV: tl.constexpr = HQ // G
    b = (i_bh // HQ).to(tl.int64)
    hq = i_bh % HQ
    hk = hq // G
    ot = tl.arange(0, BT)
    tt = i_t * BT + ot
    mt = tt < T
    od, ov, of = tl.arange(0, BD), tl.arange(0, BV), tl.arange(0, BF)
    md, mv, mf = od < D, ov < V, of < F
    qrow = (b * T + tt) * HQ + hq
    mtv = mt[:, None] & mv[None, :]
    qb = tl.load(q + qrow[:, None] * D + od[None, :], mask=mt[:, None] & md[None, :], other=0.0)
    fqb = tl.load(fq + qrow[:, None] * F + of[None, :], mask=mt[:, None] & mf[None, :], other=0.0)
    m = tl.load(mrow + qrow, mask=mt, other=0.0)
    idx = tl.load(irow + qrow, mask=mt, other=0)
    dob = tl.load(do + qrow[:, None] * V + ov[None, :], mask=mtv, other=0.0).to(tl.float32)
    if NORM:
        # out = num / (den + eps): dnum = do / (den + eps), dden = -<do, out> / (den + eps)
        r = 1.0 / (tl.load(den + qrow, mask=mt, other=1.0) + eps)
        ob = tl.load(o + qrow[:, None] * V + ov[None, :], mask=mtv, other=0.0).to(tl.float32)
        dnum = dob * r[:, None]
        dden = -tl.sum(dob * ob, 1) * r
    else:
        dnum = dob
        dden = tl.load(dden_in + qrow, mask=mt, other=0.0)
    dnc = dnum.to(qb.dtype)
    tl.store(dnum_out + qrow[:, None] * V + ov[None, :], dnc, mask=mtv)
    tl.store(dden_out + qrow, dden, mask=mt)
    lo = tl.maximum(i_t - L, 0)
    hoff = ((b * NT + lo) * HKV + hk) * F * V
    ht = tl.load(h + hoff + of[None, :] * V + ov[:, None], mask=mf[None, :] & mv[:, None], other=0.0)  # [BV, BF]
    zv = tl.load(zb + ((b * NT + lo) * HKV + hk) * F + of, mask=mf, other=0.0)
    dfq_acc = _dot(dnc, ht, F32) + dden[:, None] * zv[None, :]
    dq_acc = tl.zeros([BT, BD], dtype=tl.float32)
    delta = tl.zeros([BT], dtype=tl.float32)
    for j in range(lo, i_t + 1):
        ss = j * BT + ot
        ms = ss < T
        krow = (b * T + ss) * HKV + hk
        kb = tl.load(k + krow[:, None] * D + od[None, :], mask=ms[:, None] & md[None, :], other=0.0)
        fkb = tl.load(fk + krow[:, None] * F + of[None, :], mask=ms[:, None] & mf[None, :], other=0.0)
        vb = tl.load(v + krow[:, None] * V + ov[None, :], mask=ms[:, None] & mv[None, :], other=0.0)
        win, lin = _masks(tt, ss, mt, ms, W)
        s = _dot(qb, tl.trans(kb), F32) * scale
        p = tl.where(win, tl.exp(s - m[:, None]), 0.0)
        dpv = _dot(dnc, tl.trans(vb), F32) + dden[:, None]  # d(P) = d(A) = <dnum, v_j> + dden
        ds = p * dpv
        delta += tl.sum(ds, 1)
        dq_acc += _dot(ds.to(kb.dtype), kb, F32)
        da = tl.where(lin, dpv, 0.0)
        dfq_acc += _dot(da.to(fkb.dtype), fkb, F32)
    # the row max's gradient -delta lands on the argmax key: dq -= delta * k[argmax]
    kidx = tl.load(k + ((b * T + idx) * HKV + hk)[:, None] * D + od[None, :], mask=mt[:, None] & md[None, :],
                   other=0.0).to(tl.float32)
    dq_acc = (dq_acc - delta[:, None] * kidx) * scale
    tl.store(dq + qrow[:, None] * D + od[None, :], dq_acc.to(dq.dtype.element_ty), mask=mt[:, None] & md[None, :])
    tl.store(dfq + qrow[:, None] * F + of[None, :], dfq_acc.to(dfq.dtype.element_ty),
             mask=mt[:, None] & mf[None, :])
    tl.store(delta_out + qrow, delta, mask=mt)


@triton.jit
def _hyb_bwd_kv(q, k, v, fq, fk, dh, dzb, dnum, dden, mrow, irow, delta, dk, dv, dfk, scale, T, NT,
                HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, V: tl.constexpr, F: tl.constexpr,
                BD: tl.constexpr, BV: tl.constexpr, BF: tl.constexpr, BT: tl.constexpr, W: tl.constexpr,
                L: tl.constexpr, F32: tl.constexpr):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    HKV: tl.constexpr = HQ // G
    b = (i_bh // HKV).to(tl.int64)
    hk = i_bh % HKV
    ot = tl.arange(0, BT)
    ss = i_t * BT + ot
    ms = ss < T
    od, ov, of = tl.arange(0, BD), tl.arange(0, BV), tl.arange(0, BF)
    md, mv, mf = od < D, ov < V, of < F
    krow = (b * T + ss) * HKV + hk
    kb = tl.load(k + krow[:, None] * D + od[None, :], mask=ms[:, None] & md[None, :], other=0.0)
    fkb = tl.load(fk + krow[:, None] * F + of[None, :], mask=ms[:, None] & mf[None, :], other=0.0)
    vb = tl.load(v + krow[:, None] * V + ov[None, :], mask=ms[:, None] & mv[None, :], other=0.0)
    # the queries that see this tile only through the state (tiles > i_t + L): dH[i_t] from the lagged scan
    hoff = ((b * NT + i_t) * HKV + hk) * F * V
    dhb = tl.load(dh + hoff + of[:, None] * V + ov[None, :], mask=mf[:, None] & mv[None, :], other=0.0)  # [BF, BV]
    dzv = tl.load(dzb + ((b * NT + i_t) * HKV + hk) * F + of, mask=mf, other=0.0)
    dv_acc = _dot(fkb, dhb, F32)
    dfk_acc = _dot(vb, tl.trans(dhb), F32) + dzv[None, :]
    dk_acc = tl.zeros([BT, BD], dtype=tl.float32)
    hi = tl.minimum(i_t + L, NT - 1)
    for n in range(i_t, hi + 1):
        tt = n * BT + ot
        mt = tt < T
        win, lin = _masks(tt, ss, mt, ms, W)
        for g in range(G):
            hq = hk * G + g
            qrow = (b * T + tt) * HQ + hq
            qb = tl.load(q + qrow[:, None] * D + od[None, :], mask=mt[:, None] & md[None, :], other=0.0)
            fqb = tl.load(fq + qrow[:, None] * F + of[None, :], mask=mt[:, None] & mf[None, :], other=0.0)
            dnb = tl.load(dnum + qrow[:, None] * V + ov[None, :], mask=mt[:, None] & mv[None, :], other=0.0)
            ddn = tl.load(dden + qrow, mask=mt, other=0.0)
            m = tl.load(mrow + qrow, mask=mt, other=0.0)
            idx = tl.load(irow + qrow, mask=mt, other=-1)
            dl = tl.load(delta + qrow, mask=mt, other=0.0)
            s = _dot(qb, tl.trans(kb), F32) * scale
            p = tl.where(win, tl.exp(s - m[:, None]), 0.0)
            a = tl.where(lin, _dot(fqb, tl.trans(fkb), F32), 0.0)
            dpv = _dot(dnb, tl.trans(vb), F32) + ddn[:, None]
            ds = p * dpv - tl.where(win & (ss[None, :] == idx[:, None]), dl[:, None], 0.0)
            dk_acc += _dot(tl.trans(ds.to(qb.dtype)), qb, F32)
            dv_acc += _dot(tl.trans((p + a).to(dnb.dtype)), dnb, F32)
            dfk_acc += _dot(tl.trans(tl.where(lin, dpv, 0.0).to(fqb.dtype)), fqb, F32)
    tl.store(dk + krow[:, None] * D + od[None, :], (dk_acc * scale).to(dk.dtype.element_ty),
             mask=ms[:, None] & md[None, :])
    tl.store(dv + krow[:, None] * V + ov[None, :], dv_acc.to(dv.dtype.element_ty), mask=ms[:, None] & mv[None, :])
    tl.store(dfk + krow[:, None] * F + of[None, :], dfk_acc.to(dfk.dtype.element_ty), mask=ms[:, None] & mf[None, :])


def _meta(q, k, v, fq, window):
    b, t, hq, d = q.shape
    hkv, vd, f = k.shape[2], v.shape[3], fq.shape[3]
    return dict(HQ=hq, G=hq // hkv, D=d, V=vd, F=f, BD=_pow2(d), BV=_pow2(vd), BF=_pow2(f), BT=BT, W=window,
                L=lag(window), F32=_f32(q))


def _fwd(q, k, v, fq, fk, window, scale, eps, norm, launch=LAUNCH):
    b, t, hq, d = q.shape
    hkv, vd, f = k.shape[2], v.shape[3], fq.shape[3]
    nt = triton.cdiv(t, BT)
    meta = _meta(q, k, v, fq, window)
    dev = q.device
    h = torch.empty(b, nt, hkv, f, vd, device=dev, dtype=q.dtype)
    zb = torch.empty(b, nt, hkv, f, device=dev, dtype=torch.float32)
    bk, bv = _blocks(f, vd)
    _fwd_h[(triton.cdiv(f, bk), triton.cdiv(vd, bv), b * hkv)](
        fk, v, h, zb, None, None, None, None, t, nt, HKV=hkv, K=f, V=vd, BT=BT, BK=bk, BV=bv,
        USE_H0=False, STORE_HT=False, WITH_Z=True, F32=meta["F32"], num_warps=4)
    o = torch.empty(b, t, hq, vd, device=dev, dtype=q.dtype if norm else torch.float32)
    den = torch.empty(b, t, hq, device=dev, dtype=torch.float32)
    m = torch.empty_like(den)
    idx = torch.empty(b, t, hq, device=dev, dtype=torch.int32)
    _hyb_fwd[(nt, b * hq)](q, k, v, fq, fk, h, zb, o, den, m, idx, scale, eps, t, nt, NORM=norm, **launch["fwd"],
                           **meta)
    return o, den, m, idx, h, zb


def _bwd(q, k, v, fq, fk, h, zb, o, den, m, idx, do, dden_in, window, scale, eps, norm, launch=LAUNCH):
    b, t, hq, d = q.shape
    hkv, vd, f = k.shape[2], v.shape[3], fq.shape[3]
    nt = triton.cdiv(t, BT)
    meta = _meta(q, k, v, fq, window)
    dev = q.device
    dnum = torch.empty(b, t, hq, vd, device=dev, dtype=q.dtype)
    dden = torch.empty(b, t, hq, device=dev, dtype=torch.float32)
    delta = torch.empty_like(dden)
    dq, dfq = torch.empty_like(q), torch.empty_like(fq)
    _hyb_bwd_q[(nt, b * hq)](q, k, v, fq, fk, h, zb, o, den, m, idx, do, dden_in, dnum, dden, delta, dq, dfq,
                             scale, eps, t, nt, NORM=norm, **launch["bwd_q"], **meta)
    dh = torch.empty_like(h)
    dzb = torch.empty(b, nt, hkv, f, device=dev, dtype=torch.float32)
    bk, bv = _blocks(f, vd)
    _bwd_dh[(triton.cdiv(f, bk), triton.cdiv(vd, bv), b * hkv)](
        fq, dnum, dden, dh, dzb, None, None, None, None, 1.0, t, nt, HQ=hq, G=hq // hkv, K=f, V=vd, BT=BT,
        BK=bk, BV=bv, USE_DHT=False, STORE_DH0=False, WITH_Z=True, LAG=meta["L"], F32=meta["F32"], num_warps=4)
    dk, dv, dfk = torch.empty_like(k), torch.empty_like(v), torch.empty_like(fk)
    _hyb_bwd_kv[(nt, b * hkv)](q, k, v, fq, fk, dh, dzb, dnum, dden, m, idx, delta, dk, dv, dfk, scale, t, nt,
                               **launch["bwd_kv"], **meta)
    return dq, dk, dv, dfq, dfk


class _HybridAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, fq, fk, window, scale, eps, norm):
        o, den, m, idx, h, zb = _fwd(q, k, v, fq, fk, window, scale, eps, norm)
        ctx.save_for_backward(q, k, v, fq, fk, h, zb, o if norm else None, den, m, idx)
        ctx.window, ctx.scale, ctx.eps, ctx.norm = window, scale, eps, norm
        if norm:
            ctx.mark_non_differentiable(den)
        return o, den

    @staticmethod
    def backward(ctx, do, dden):
        q, k, v, fq, fk, h, zb, o, den, m, idx = ctx.saved_tensors
        if do is None:
            do = torch.zeros(*q.shape[:3], v.shape[3], device=q.device, dtype=torch.float32)
        if ctx.norm or dden is None:
            dden = torch.zeros_like(den)
        grads = _bwd(q, k, v, fq, fk, h, zb, o, den, m, idx, do.contiguous(), dden.float().contiguous(),
                     ctx.window, ctx.scale, ctx.eps, ctx.norm)
        return (*grads, None, None, None, None)


def hybrid_window_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor, *,
                         window: int, scale: float, eps: float = 0.0, normalize: bool = True
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The hybrid on one sequence per row (no prefix, zero initial state), differentiable in q, k, v, fq, fk.

    q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, V], fq [B, T, Hq, F], fk [B, T, Hkv, F], one dtype
    (bf16/fp16/fp32); ``window`` >= 1. Returns (out [B, T, Hq, V] in q's dtype, den [B, T, Hq] fp32, not
    differentiable) with ``normalize``, else (num [B, T, Hq, V] fp32, den fp32), both differentiable.
    """
    if window < 1:
        raise ValueError(f"hybrid_window_linear needs window >= 1, got {window}; use linear_attention for window=0")
    dt = q.dtype
    if any(x.dtype != dt for x in (k, v, fq, fk)):
        raise ValueError(f"q/k/v/fq/fk must share one dtype; got {[x.dtype for x in (q, k, v, fq, fk)]}")
    q, k, v, fq, fk = (x.contiguous() for x in (q, k, v, fq, fk))
    return _HybridAttn.apply(q, k, v, fq, fk, int(window), float(scale), float(eps), bool(normalize))
