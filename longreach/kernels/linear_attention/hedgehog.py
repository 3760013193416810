"""Hedgehog feature map in Triton: phi(x) = [softmax(x W_h + b_h), softmax(-(x W_h + b_h))], one program per
(token range, head), forward and backward in one pass over x each (the torch path makes ~10 passes in fp32).

x [B, S, H, D] (H a multiple of Hkv, head h uses W[h // G]), W [Hkv, D, F2] fp32, b [Hkv, 1, F2] fp32
-> phi [B, S, H, 2 F2] in x's dtype. Same function as ``attention.feature_maps.HedgehogMap.forward``.

Precision: the fp32 weights are split W = W_hi + W_lo (both bf16/fp16, like x) so the projection costs two
tensor-core dots and keeps ~16 bits of W (one bf16 dot would round W to 8 bits); the backward splits
d(proj) the same way for dx and dW. dW and db are reduced per program over its token range in fp32 and
summed over programs in torch. Under TRITON_INTERPRET=1 / fp32 inputs: one fp32 dot (``_dot``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton import _dot, _f32, _pow2

BT_FM = 64
# launch options (H100 sweep, D = 128, F2 = 64, bf16: fwd 0.215 ms at 4 warps / 1 stage, bwd 0.73 ms at 4 / 2)
LAUNCH = {"fwd": dict(num_warps=4, num_stages=1), "bwd": dict(num_warps=4, num_stages=2)}


@triton.jit
def _proj(xb, wh, wl, bb, mf, SPLIT: tl.constexpr, F32: tl.constexpr):
    proj = _dot(xb, wh, F32)
    if SPLIT:
        proj += _dot(xb, wl, F32)
    proj += bb[None, :]
    p1 = tl.where(mf[None, :], proj, float("-inf"))
    p1 = tl.exp(p1 - tl.max(p1, 1)[:, None])
    p1 = p1 / tl.sum(p1, 1)[:, None]
    p2 = tl.where(mf[None, :], -proj, float("-inf"))
    p2 = tl.exp(p2 - tl.max(p2, 1)[:, None])
    p2 = p2 / tl.sum(p2, 1)[:, None]
    return p1, p2


@triton.jit
def _hh_fwd(x, wh, wl, bias, out, S, TPP,
            H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, FH: tl.constexpr, BD: tl.constexpr,
            BF: tl.constexpr, BT: tl.constexpr, SPLIT: tl.constexpr, F32: tl.constexpr):
    i_s, i_bh = tl.program_id(0), tl.program_id(1)
    b = (i_bh // H).to(tl.int64)
    h = i_bh % H
    hk = h // G
    ot, od, of = tl.arange(0, BT), tl.arange(0, BD), tl.arange(0, BF)
    md, mf = od < D, of < FH
    woff = hk * D * FH + od[:, None] * FH + of[None, :]
    wb = tl.load(wh + woff, mask=md[:, None] & mf[None, :], other=0.0)
    wlb = wb
    if SPLIT:
        wlb = tl.load(wl + woff, mask=md[:, None] & mf[None, :], other=0.0)
    bb = tl.load(bias + hk * FH + of, mask=mf, other=0.0)
    for i in range(0, TPP, BT):
        tt = i_s * TPP + i + ot
        mt = tt < S
        row = (b * S + tt) * H + h
        xb = tl.load(x + row[:, None] * D + od[None, :], mask=mt[:, None] & md[None, :], other=0.0)
        p1, p2 = _proj(xb, wb, wlb, bb, mf, SPLIT, F32)
        om = mt[:, None] & mf[None, :]
        tl.store(out + row[:, None] * (2 * FH) + of[None, :], p1.to(out.dtype.element_ty), mask=om)
        tl.store(out + row[:, None] * (2 * FH) + FH + of[None, :], p2.to(out.dtype.element_ty), mask=om)


@triton.jit
def _hh_bwd(x, wh, wl, bias, dout, dx, dw, db, S, TPP,
            H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, FH: tl.constexpr, BD: tl.constexpr,
            BF: tl.constexpr, BT: tl.constexpr, SPLIT: tl.constexpr, F32: tl.constexpr):
    i_s, i_bh = tl.program_id(0), tl.program_id(1)
    b = (i_bh // H).to(tl.int64)
    h = i_bh % H
    hk = h // G
    ot, od, of = tl.arange(0, BT), tl.arange(0, BD), tl.arange(0, BF)
    md, mf = od < D, of < FH
    woff = hk * D * FH + od[:, None] * FH + of[None, :]
    wb = tl.load(wh + woff, mask=md[:, None] & mf[None, :], other=0.0)
    wlb = wb
    if SPLIT:
        wlb = tl.load(wl + woff, mask=md[:, None] & mf[None, :], other=0.0)
    bb = tl.load(bias + hk * FH + of, mask=mf, other=0.0)
    dw_acc = tl.zeros([BD, BF], dtype=tl.float32)
    db_acc = tl.zeros([BF], dtype=tl.float32)
    for i in range(0, TPP, BT):
        tt = i_s * TPP + i + ot
        mt = tt < S
        row = (b * S + tt) * H + h
        om = mt[:, None] & mf[None, :]
        xb = tl.load(x + row[:, None] * D + od[None, :], mask=mt[:, None] & md[None, :], other=0.0)
        p1, p2 = _proj(xb, wb, wlb, bb, mf, SPLIT, F32)
        d1 = tl.load(dout + row[:, None] * (2 * FH) + of[None, :], mask=om, other=0.0).to(tl.float32)
        d2 = tl.load(dout + row[:, None] * (2 * FH) + FH + of[None, :], mask=om, other=0.0).to(tl.float32)
        # softmax backward for both halves; the second one is of -proj
        dp = p1 * (d1 - tl.sum(p1 * d1, 1)[:, None]) - p2 * (d2 - tl.sum(p2 * d2, 1)[:, None])
        dp = tl.where(om, dp, 0.0)
        db_acc += tl.sum(dp, 0)
        if SPLIT:
            dph = dp.to(xb.dtype)
            dpl = (dp - dph.to(tl.float32)).to(xb.dtype)
            dxb = _dot(dph, tl.trans(wb), F32) + _dot(dpl, tl.trans(wb), F32) + _dot(dph, tl.trans(wlb), F32)
            dw_acc += _dot(tl.trans(xb), dph, F32) + _dot(tl.trans(xb), dpl, F32)
        else:
            dxb = _dot(dp, tl.trans(wb), F32)
            dw_acc += _dot(tl.trans(xb), dp, F32)
        tl.store(dx + row[:, None] * D + od[None, :], dxb.to(dx.dtype.element_ty), mask=mt[:, None] & md[None, :])
    poff = (i_s * tl.num_programs(1) + i_bh).to(tl.int64)
    tl.store(dw + poff * BD * BF + od[:, None] * BF + of[None, :], dw_acc)
    tl.store(db + poff * BF + of, db_acc)


def _split(w: torch.Tensor, dt: torch.dtype, f32: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
    if f32:
        w32 = w.float().contiguous()
        return w32, w32, False
    hi = w.to(dt)
    lo = (w.float() - hi.float()).to(dt)
    return hi.contiguous(), lo.contiguous(), True


def _grid(b: int, s: int, h: int) -> tuple[int, int]:
    # enough programs to fill the GPU (~8 per SM), each over a long token range so the dW partials stay small
    ns = min(triton.cdiv(s, BT_FM), max(1, triton.cdiv(1056, b * h)))
    tpp = triton.cdiv(triton.cdiv(s, ns), BT_FM) * BT_FM
    return triton.cdiv(s, tpp), tpp


class _Hedgehog(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        b, s, h, d = x.shape
        hkv, _, fh = weight.shape
        f32 = _f32(x)
        wh, wl, split = _split(weight, x.dtype, f32)
        bf = bias.float().reshape(hkv, fh).contiguous()
        out = torch.empty(b, s, h, 2 * fh, device=x.device, dtype=x.dtype)
        ns, tpp = _grid(b, s, h)
        meta = dict(H=h, G=h // hkv, D=d, FH=fh, BD=_pow2(d), BF=_pow2(fh), BT=BT_FM, SPLIT=split, F32=f32)
        _hh_fwd[(ns, b * h)](x, wh, wl, bf, out, s, tpp, **LAUNCH["fwd"], **meta)
        ctx.save_for_backward(x, wh, wl, bf)
        ctx.meta, ctx.grid, ctx.wshape = meta, (ns, tpp), (weight.shape, weight.dtype, bias.shape, bias.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, wh, wl, bf = ctx.saved_tensors
        meta = ctx.meta
        ns, tpp = ctx.grid
        b, s, h, d = x.shape
        (wshape, wdt, bshape, bdt) = ctx.wshape
        hkv, _, fh = wshape
        bd, bfp = meta["BD"], meta["BF"]
        dx = torch.empty_like(x)
        dw = torch.empty(ns, b, h, bd, bfp, device=x.device, dtype=torch.float32)
        db = torch.empty(ns, b, h, bfp, device=x.device, dtype=torch.float32)
        _hh_bwd[(ns, b * h)](x, wh, wl, bf, dout.contiguous(), dx, dw, db, s, tpp, **LAUNCH["bwd"], **meta)
        g = h // hkv
        dw = dw[..., :d, :fh].view(ns, b, hkv, g, d, fh).sum((0, 1, 3))
        db = db[..., :fh].view(ns, b, hkv, g, fh).sum((0, 1, 3))
        return dx, dw.to(wdt).view(wshape), db.to(bdt).view(bshape)


def hedgehog_feature_map(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """phi(x) [B, S, H, 2 F2] (x's dtype) for x [B, S, H, D], weight [Hkv, D, F2], bias [Hkv, 1, F2];
    differentiable in all three."""
    if x.shape[2] % weight.shape[0] != 0:
        raise ValueError(f"feature map has {weight.shape[0]} KV heads but the input has {x.shape[2]} heads "
                         "(not a multiple)")
    return _Hedgehog.apply(x.contiguous(), weight, bias)
