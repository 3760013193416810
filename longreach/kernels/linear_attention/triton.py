"""Chunked causal linear attention in Triton: forward and backward, fp32 state accumulation, initial state
in, final state out, GQA without repeating K/V, optional normaliser (denominator) output.

Same function as ``reference.linear_attention_quadratic`` (see there for the maths). The algorithm is the
two-pass chunked form of flash-linear-attention (Yang et al. 2024, arXiv:2312.06635):

forward   _fwd_h    sequential over chunks, parallel over (K block, V block, batch x KV head): writes the
                    state entering every chunk h[b, n, hk] (input dtype) and the final state (fp32)
          _fwd_o    parallel over (V block, chunk, batch x query head): o = scale * (q h_n + tril(q k^T) v)
backward  _bwd_dh   reverse-sequential: dH[n] = d(final) + scale * sum_{m > n} q_m^T do_m (summed over the
                    query heads of a KV group), and d(initial state)
          _bwd_dq   parallel over (K block, chunk, batch x query head)
          _bwd_dk   parallel over (K block, chunk, batch x KV head), loops over the query heads of the group
          _bwd_dv   parallel over (V block, chunk, batch x KV head), likewise

Layout: q [B, T, Hq, K], k [B, T, Hkv, K], v [B, T, Hkv, V], contiguous. Chunk size ``FWD.bt`` (128; 64 in the window hybrid). T need not be
a multiple of BT (masked loads). Under TRITON_INTERPRET=1 the dots run in fp32 (the interpreter's bf16
``tl.dot`` is wrong, triton-lang/triton#11584).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .reference import LinearAttnOut

BT = 64
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    # F32: full-precision fp32 products (fp32 inputs, and the interpreter whose bf16 dot is wrong);
    # Triton's default for an fp32 dot is tf32 (~3e-4 relative error per product, 1e-3 at the output)
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _fwd_h(k, v, h, zb, h0, z0, ht, zt, T, NT,
           HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
           BV: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr, WITH_Z: tl.constexpr,
           F32: tl.constexpr):
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (i_bh // HKV).to(tl.int64)
    hk = i_bh % HKV
    ok = i_k * BK + tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    ot = tl.arange(0, BT)
    mk, mv = ok < K, ov < V
    mkv = mk[:, None] & mv[None, :]
    soff = (b * HKV + hk) * K * V + ok[:, None] * V + ov[None, :]
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    zacc = tl.zeros([BK], dtype=tl.float32)
    if USE_H0:
        acc += tl.load(h0 + soff, mask=mkv, other=0.0).to(tl.float32)
        if WITH_Z:
            zacc += tl.load(z0 + (b * HKV + hk) * K + ok, mask=mk, other=0.0).to(tl.float32)
    for i_t in range(NT):
        hoff = ((b * NT + i_t) * HKV + hk) * K * V
        tl.store(h + hoff + ok[:, None] * V + ov[None, :], acc.to(h.dtype.element_ty), mask=mkv)
        tt = i_t * BT + ot
        mt = tt < T
        kb = tl.load(k + ((b * T + tt[None, :]) * HKV + hk) * K + ok[:, None], mask=mt[None, :] & mk[:, None],
                     other=0.0)  # [BK, BT]
        vb = tl.load(v + ((b * T + tt[:, None]) * HKV + hk) * V + ov[None, :], mask=mt[:, None] & mv[None, :],
                     other=0.0)  # [BT, BV]
        if WITH_Z:
            if i_v == 0:
                tl.store(zb + ((b * NT + i_t) * HKV + hk) * K + ok, zacc, mask=mk)
                zacc += tl.sum(kb.to(tl.float32), 1)
        acc += _dot(kb, vb, F32)
    if STORE_HT:
        tl.store(ht + soff, acc, mask=mkv)
        if WITH_Z:
            if i_v == 0:
                tl.store(zt + (b * HKV + hk) * K + ok, zacc, mask=mk)


@triton.jit
def _fwd_o(q, k, v, h, zb, o, den, scale, T, NT,
           HQ: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
           BK: tl.constexpr, BV: tl.constexpr, WITH_Z: tl.constexpr, F32: tl.constexpr):
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    HKV: tl.constexpr = HQ // G
    b = (i_bh // HQ).to(tl.int64)
    hq = i_bh % HQ
    hk = hq // G
    ot = tl.arange(0, BT)
    tt = i_t * BT + ot
    mt = tt < T
    ov = i_v * BV + tl.arange(0, BV)
    mv = ov < V
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    a = tl.zeros([BT, BT], dtype=tl.float32)
    dacc = tl.zeros([BT], dtype=tl.float32)
    hoff = ((b * NT + i_t) * HKV + hk) * K * V
    for i_k in range(0, tl.cdiv(K, BK)):
        ok = i_k * BK + tl.arange(0, BK)
        mk = ok < K
        qb = tl.load(q + ((b * T + tt[:, None]) * HQ + hq) * K + ok[None, :], mask=mt[:, None] & mk[None, :],
                     other=0.0)  # [BT, BK]
        kb = tl.load(k + ((b * T + tt[None, :]) * HKV + hk) * K + ok[:, None], mask=mt[None, :] & mk[:, None],
                     other=0.0)  # [BK, BT]
        hb = tl.load(h + hoff + ok[:, None] * V + ov[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        acc += _dot(qb, hb, F32)
        a += _dot(qb, kb, F32)
        if WITH_Z:
            if i_v == 0:
                zv = tl.load(zb + ((b * NT + i_t) * HKV + hk) * K + ok, mask=mk, other=0.0)
                dacc += tl.sum(qb.to(tl.float32) * zv[None, :], 1)
    a = tl.where(ot[:, None] >= ot[None, :], a, 0.0)
    vb = tl.load(v + ((b * T + tt[:, None]) * HKV + hk) * V + ov[None, :], mask=mt[:, None] & mv[None, :], other=0.0)
    acc += _dot(a.to(vb.dtype), vb, F32)
    tl.store(o + ((b * T + tt[:, None]) * HQ + hq) * V + ov[None, :], (acc * scale).to(o.dtype.element_ty),
             mask=mt[:, None] & mv[None, :])
    if WITH_Z:
        if i_v == 0:
            tl.store(den + (b * T + tt) * HQ + hq, (dacc + tl.sum(a, 1)) * scale, mask=mt)


@triton.jit
def _bwd_dh(q, do, dden, dh, dzb, dht, dzt, dh0, dz0, scale, T, NT,
            HQ: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
            BK: tl.constexpr, BV: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
            WITH_Z: tl.constexpr, F32: tl.constexpr, LAG: tl.constexpr = 0):
    # LAG > 0 (the hybrid of window.py): the queries of chunk n read the state entering chunk n - LAG, so
    # dH[n] = sum over query chunks m > n + LAG; chunks past the end are masked out
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    HKV: tl.constexpr = HQ // G
    b = (i_bh // HKV).to(tl.int64)
    hk = i_bh % HKV
    ok = i_k * BK + tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    ot = tl.arange(0, BT)
    mk, mv = ok < K, ov < V
    mkv = mk[:, None] & mv[None, :]
    soff = (b * HKV + hk) * K * V + ok[:, None] * V + ov[None, :]
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    zacc = tl.zeros([BK], dtype=tl.float32)
    if USE_DHT:
        acc += tl.load(dht + soff, mask=mkv, other=0.0).to(tl.float32)
        if WITH_Z:
            zacc += tl.load(dzt + (b * HKV + hk) * K + ok, mask=mk, other=0.0).to(tl.float32)
    for i in range(NT):
        i_t = NT - 1 - i
        hoff = ((b * NT + i_t) * HKV + hk) * K * V
        tl.store(dh + hoff + ok[:, None] * V + ov[None, :], acc.to(dh.dtype.element_ty), mask=mkv)
        if WITH_Z:
            if i_v == 0:
                tl.store(dzb + ((b * NT + i_t) * HKV + hk) * K + ok, zacc, mask=mk)
        tt = (i_t + LAG) * BT + ot
        mt = tt < T
        part = tl.zeros([BK, BV], dtype=tl.float32)
        for g in range(G):
            hq = hk * G + g
            qb = tl.load(q + ((b * T + tt[None, :]) * HQ + hq) * K + ok[:, None], mask=mt[None, :] & mk[:, None],
                         other=0.0)  # [BK, BT]
            dob = tl.load(do + ((b * T + tt[:, None]) * HQ + hq) * V + ov[None, :], mask=mt[:, None] & mv[None, :],
                          other=0.0)  # [BT, BV]
            part += _dot(qb, dob, F32)
            if WITH_Z:
                if i_v == 0:
                    dd = tl.load(dden + (b * T + tt) * HQ + hq, mask=mt, other=0.0)
                    zacc += tl.sum(qb.to(tl.float32) * dd[None, :], 1) * scale
        acc += part * scale
    if STORE_DH0:
        tl.store(dh0 + soff, acc, mask=mkv)
        if WITH_Z:
            if i_v == 0:
                tl.store(dz0 + (b * HKV + hk) * K + ok, zacc, mask=mk)


@triton.jit
def _bwd_dq(k, v, h, zb, do, dden, dq, scale, T, NT,
            HQ: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
            BK: tl.constexpr, BV: tl.constexpr, WITH_Z: tl.constexpr, F32: tl.constexpr):
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    HKV: tl.constexpr = HQ // G
    b = (i_bh // HQ).to(tl.int64)
    hq = i_bh % HQ
    hk = hq // G
    ot = tl.arange(0, BT)
    tt = i_t * BT + ot
    mt = tt < T
    ok = i_k * BK + tl.arange(0, BK)
    mk = ok < K
    hoff = ((b * NT + i_t) * HKV + hk) * K * V
    acc = tl.zeros([BT, BK], dtype=tl.float32)
    da = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        ov = i_v * BV + tl.arange(0, BV)
        mv = ov < V
        dob = tl.load(do + ((b * T + tt[:, None]) * HQ + hq) * V + ov[None, :], mask=mt[:, None] & mv[None, :],
                      other=0.0)  # [BT, BV]
        vb = tl.load(v + ((b * T + tt[None, :]) * HKV + hk) * V + ov[:, None], mask=mt[None, :] & mv[:, None],
                     other=0.0)  # [BV, BT]
        hb = tl.load(h + hoff + ok[None, :] * V + ov[:, None], mask=mk[None, :] & mv[:, None], other=0.0)  # [BV, BK]
        acc += _dot(dob, hb, F32)
        da += _dot(dob, vb, F32)
    if WITH_Z:
        dd = tl.load(dden + (b * T + tt) * HQ + hq, mask=mt, other=0.0)
        zv = tl.load(zb + ((b * NT + i_t) * HKV + hk) * K + ok, mask=mk, other=0.0)
        da += dd[:, None]
        acc += dd[:, None] * zv[None, :]
    da = tl.where(ot[:, None] >= ot[None, :], da, 0.0)
    kb = tl.load(k + ((b * T + tt[:, None]) * HKV + hk) * K + ok[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
    acc += _dot(da.to(kb.dtype), kb, F32)
    tl.store(dq + ((b * T + tt[:, None]) * HQ + hq) * K + ok[None, :], (acc * scale).to(dq.dtype.element_ty),
             mask=mt[:, None] & mk[None, :])


@triton.jit
def _bwd_dv(q, k, dh, do, dv, scale, T, NT,
            HQ: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
            BK: tl.constexpr, BV: tl.constexpr, F32: tl.constexpr):
    # dv = k dH_n + scale * sum_g tril(q_g k^T)^T do_g, one V block per program (A recomputed per block)
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    HKV: tl.constexpr = HQ // G
    b = (i_bh // HKV).to(tl.int64)
    hk = i_bh % HKV
    ot = tl.arange(0, BT)
    tt = i_t * BT + ot
    mt = tt < T
    ov = i_v * BV + tl.arange(0, BV)
    mv = ov < V
    hoff = ((b * NT + i_t) * HKV + hk) * K * V
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        ok = i_k * BK + tl.arange(0, BK)
        mk = ok < K
        kb = tl.load(k + ((b * T + tt[:, None]) * HKV + hk) * K + ok[None, :], mask=mt[:, None] & mk[None, :],
                     other=0.0)
        dhb = tl.load(dh + hoff + ok[:, None] * V + ov[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        acc += _dot(kb, dhb, F32)  # dH already carries the scale
    causal_t = ot[:, None] <= ot[None, :]  # [j, t]: key j visible to query t
    part = tl.zeros([BT, BV], dtype=tl.float32)
    for g in range(G):
        hq = hk * G + g
        at = tl.zeros([BT, BT], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):
            ok = i_k * BK + tl.arange(0, BK)
            mk = ok < K
            kb = tl.load(k + ((b * T + tt[:, None]) * HKV + hk) * K + ok[None, :], mask=mt[:, None] & mk[None, :],
                         other=0.0)  # [BT, BK]
            qt = tl.load(q + ((b * T + tt[None, :]) * HQ + hq) * K + ok[:, None], mask=mt[None, :] & mk[:, None],
                         other=0.0)  # [BK, BT]
            at += _dot(kb, qt, F32)
        at = tl.where(causal_t, at, 0.0)
        dob = tl.load(do + ((b * T + tt[:, None]) * HQ + hq) * V + ov[None, :], mask=mt[:, None] & mv[None, :],
                      other=0.0)
        part += _dot(at.to(dob.dtype), dob, F32)
    acc += part * scale
    tl.store(dv + ((b * T + tt[:, None]) * HKV + hk) * V + ov[None, :], acc.to(dv.dtype.element_ty),
             mask=mt[:, None] & mv[None, :])


@triton.jit
def _bwd_dk(q, v, dh, dzb, do, dden, dk, scale, T, NT,
            HQ: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
            BK: tl.constexpr, BV: tl.constexpr, WITH_Z: tl.constexpr, F32: tl.constexpr):
    # dk = v dH_n^T (+ dz_n) + scale * sum_g tril(do_g v^T (+ dden_g))^T q_g, one K block per program
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    HKV: tl.constexpr = HQ // G
    b = (i_bh // HKV).to(tl.int64)
    hk = i_bh % HKV
    ot = tl.arange(0, BT)
    tt = i_t * BT + ot
    mt = tt < T
    ok = i_k * BK + tl.arange(0, BK)
    mk = ok < K
    hoff = ((b * NT + i_t) * HKV + hk) * K * V
    acc = tl.zeros([BT, BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        ov = i_v * BV + tl.arange(0, BV)
        mv = ov < V
        vb = tl.load(v + ((b * T + tt[:, None]) * HKV + hk) * V + ov[None, :], mask=mt[:, None] & mv[None, :],
                     other=0.0)  # [BT, BV]
        dht = tl.load(dh + hoff + ok[None, :] * V + ov[:, None], mask=mk[None, :] & mv[:, None], other=0.0)  # [BV, BK]
        acc += _dot(vb, dht, F32)
    if WITH_Z:
        dzv = tl.load(dzb + ((b * NT + i_t) * HKV + hk) * K + ok, mask=mk, other=0.0)
        acc += dzv[None, :]
    causal_t = ot[:, None] <= ot[None, :]
    part = tl.zeros([BT, BK], dtype=tl.float32)
    for g in range(G):
        hq = hk * G + g
        dat = tl.zeros([BT, BT], dtype=tl.float32)
        for i_v in range(0, tl.cdiv(V, BV)):
            ov = i_v * BV + tl.arange(0, BV)
            mv = ov < V
            vb = tl.load(v + ((b * T + tt[:, None]) * HKV + hk) * V + ov[None, :], mask=mt[:, None] & mv[None, :],
                         other=0.0)  # [BT, BV]
            dot_ = tl.load(do + ((b * T + tt[None, :]) * HQ + hq) * V + ov[:, None], mask=mt[None, :] & mv[:, None],
                           other=0.0)  # [BV, BT]
            dat += _dot(vb, dot_, F32)
        if WITH_Z:
            dd = tl.load(dden + (b * T + tt) * HQ + hq, mask=mt, other=0.0)
            dat += dd[None, :]
        dat = tl.where(causal_t, dat, 0.0)
        qb = tl.load(q + ((b * T + tt[:, None]) * HQ + hq) * K + ok[None, :], mask=mt[:, None] & mk[None, :],
                     other=0.0)
        part += _dot(dat.to(qb.dtype), qb, F32)
    acc += part * scale
    tl.store(dk + ((b * T + tt[:, None]) * HKV + hk) * K + ok[None, :], acc.to(dk.dtype.element_ty),
             mask=mt[:, None] & mk[None, :])


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _blocks(kd: int, vd: int) -> tuple[int, int]:
    # 64-wide state tiles: a [64, 64] fp32 accumulator per program keeps registers in check and gives the
    # sequential state passes (B * Hkv * K/64 * V/64 programs) enough parallelism to fill the GPU
    return min(64, _pow2(kd)), min(64, _pow2(vd))


def _f32(q: torch.Tensor) -> bool:
    return _INTERPRET or q.dtype == torch.float32


@dataclass(frozen=True)
class FwdCfg:
    """Forward launch config of the plain kernel: chunk size (the backward follows it), the state pass's
    (BK, BV, warps, stages) and the output pass's (BK, BV, warps, stages). BK/BV are capped at the head dims;
    fp32 inputs keep 64-wide output tiles (shared memory)."""

    bt: int = 128
    h_bk: int = 64
    h_bv: int = 128
    h_warps: int = 4
    h_stages: int = 4
    o_bk: int = 64
    o_bv: int = 128
    o_warps: int = 8
    o_stages: int = 4


# defaults: the H100 sweep's pick (longreach/launch/bench/linear_sweep.py, bench/results/
# linear_fwd_sweep_h100_2026-11-24.json): 128-token chunks halve the chunk states written and read (forward
# 0.81 vs 1.02 ms at 32K for 64-token chunks with the old tiles; fla 0.97); the sweep replaces FWD
FWD = FwdCfg()
# fp32 inputs on a GPU: 64-token chunks and 64-wide tiles (fp32 tiles of the bf16 config overflow shared memory)
FWD_FP32 = FwdCfg(bt=64, h_bk=64, h_bv=64, h_warps=4, h_stages=3, o_bk=64, o_bv=64, o_warps=4, o_stages=3)


def _fwd(q, k, v, scale, h0, z0, with_den, want_final):
    f32 = _f32(q)
    # the interpreter (fp32 dots either way) runs the bf16 config, so CI covers the tiles the GPU runs
    cfg = FWD_FP32 if (q.dtype == torch.float32 and not _INTERPRET) else FWD
    bt = cfg.bt
    b, t, hq, kd = q.shape
    hkv, vd = k.shape[2], v.shape[3]
    g = hq // hkv
    nt = triton.cdiv(t, bt)
    bk, bv = min(cfg.h_bk, _pow2(kd)), min(cfg.h_bv, _pow2(vd))
    dev = q.device
    h = torch.empty(b, nt, hkv, kd, vd, device=dev, dtype=q.dtype)
    zb = torch.empty(b, nt, hkv, kd, device=dev, dtype=torch.float32) if with_den else None
    ht = torch.empty(b, hkv, kd, vd, device=dev, dtype=torch.float32) if want_final else None
    zt = torch.empty(b, hkv, kd, device=dev, dtype=torch.float32) if (want_final and with_den) else None
    _fwd_h[(triton.cdiv(kd, bk), triton.cdiv(vd, bv), b * hkv)](
        k, v, h, zb, h0, z0, ht, zt, t, nt, HKV=hkv, K=kd, V=vd, BT=bt, BK=bk, BV=bv,
        USE_H0=h0 is not None, STORE_HT=want_final, WITH_Z=with_den, F32=f32, num_warps=cfg.h_warps,
        num_stages=cfg.h_stages)
    o = torch.empty(b, t, hq, vd, device=dev, dtype=q.dtype)
    den = torch.empty(b, t, hq, device=dev, dtype=torch.float32) if with_den else None
    bk_o, bv_o = min(cfg.o_bk, _pow2(kd)), min(cfg.o_bv, _pow2(vd))
    _fwd_o[(triton.cdiv(vd, bv_o), nt, b * hq)](
        q, k, v, h, zb, o, den, scale, t, nt, HQ=hq, G=g, K=kd, V=vd, BT=bt, BK=bk_o, BV=bv_o,
        WITH_Z=with_den, F32=f32, num_warps=cfg.o_warps, num_stages=cfg.o_stages)
    return o, den, ht, zt, h, zb, bt


def _bwd(q, k, v, h, zb, do, dden, dht, dzt, scale, want_dh0, want_dz0, bt=BT):
    f32 = _f32(q)
    b, t, hq, kd = q.shape
    hkv, vd = k.shape[2], v.shape[3]
    g = hq // hkv
    nt = triton.cdiv(t, bt)
    bk, bv = _blocks(kd, vd)
    dev = q.device
    with_den = dden is not None
    dh = torch.empty_like(h)
    dzb = torch.empty(b, nt, hkv, kd, device=dev, dtype=torch.float32) if with_den else None
    dh0 = torch.empty(b, hkv, kd, vd, device=dev, dtype=torch.float32) if want_dh0 else None
    dz0 = torch.empty(b, hkv, kd, device=dev, dtype=torch.float32) if (want_dh0 and with_den) else None
    if with_den and dzt is None and dht is not None:
        dzt = torch.zeros(b, hkv, kd, device=dev, dtype=torch.float32)
    if with_den and dht is None and dzt is not None:
        dht = torch.zeros(b, hkv, kd, vd, device=dev, dtype=torch.float32)
    _bwd_dh[(triton.cdiv(kd, bk), triton.cdiv(vd, bv), b * hkv)](
        q, do, dden, dh, dzb, dht, dzt, dh0, dz0, scale, t, nt, HQ=hq, G=g, K=kd, V=vd, BT=bt, BK=bk, BV=bv,
        USE_DHT=dht is not None, STORE_DH0=want_dh0, WITH_Z=with_den, F32=f32, num_warps=4)
    dq = torch.empty_like(q)
    _bwd_dq[(triton.cdiv(kd, bk), nt, b * hq)](
        k, v, h, zb, do, dden, dq, scale, t, nt, HQ=hq, G=g, K=kd, V=vd, BT=bt, BK=bk, BV=bv,
        WITH_Z=with_den, F32=f32, num_warps=4)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    _bwd_dk[(triton.cdiv(kd, bk), nt, b * hkv)](
        q, v, dh, dzb, do, dden, dk, scale, t, nt, HQ=hq, G=g, K=kd, V=vd, BT=bt, BK=bk, BV=bv,
        WITH_Z=with_den, F32=f32, num_warps=4)
    _bwd_dv[(triton.cdiv(vd, bv), nt, b * hkv)](
        q, k, dh, do, dv, scale, t, nt, HQ=hq, G=g, K=kd, V=vd, BT=bt, BK=bk, BV=bv, F32=f32, num_warps=4)
    return dq, dk, dv, dh0, (dz0 if want_dz0 else None)


class _ChunkLinearAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, h0, z0, scale, with_den, want_final):
        o, den, ht, zt, h, zb, bt = _fwd(q, k, v, scale, h0, z0, with_den, want_final)
        ctx.save_for_backward(q, k, v, h, zb)
        ctx.scale, ctx.with_den, ctx.bt = scale, with_den, bt
        ctx.has_h0, ctx.has_z0 = h0 is not None, z0 is not None
        return o, den, ht, zt

    @staticmethod
    def backward(ctx, do, dden, dht, dzt):
        q, k, v, h, zb = ctx.saved_tensors
        dden = dden.contiguous().float() if (ctx.with_den and dden is not None) else (
            torch.zeros(q.shape[:3], device=q.device, dtype=torch.float32) if ctx.with_den else None)
        dq, dk, dv, dh0, dz0 = _bwd(q, k, v, h, zb, do.contiguous(), dden,
                                    None if dht is None else dht.contiguous().float(),
                                    None if dzt is None else dzt.contiguous().float(),
                                    ctx.scale, ctx.has_h0 or ctx.has_z0, ctx.has_z0, ctx.bt)
        return (dq, dk, dv, dh0 if ctx.has_h0 else None, dz0, None, None, None)


def chunk_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float = 1.0,
                           initial_state: Optional[torch.Tensor] = None, initial_z: Optional[torch.Tensor] = None,
                           with_den: bool = False, output_final_state: bool = False) -> LinearAttnOut:
    """Triton chunked causal linear attention (differentiable in q, k, v and the initial states).

    q [B, T, Hq, K], k [B, T, Hkv, K], v [B, T, Hkv, V] (fp32/bf16/fp16, same dtype);
    initial_state [B, Hkv, K, V] and initial_z [B, Hkv, K] (any float dtype, used in fp32).
    Returns ``LinearAttnOut(o [B,T,Hq,V] input dtype, den [B,T,Hq] fp32 | None, state fp32 | None, z | None)``.
    """
    if initial_z is not None and not with_den:
        raise ValueError("initial_z is the normaliser state; pass with_den=True with it")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    h0 = None if initial_state is None else initial_state.float().contiguous()
    z0 = None if initial_z is None else initial_z.float().contiguous()
    b, _, _, kd = q.shape
    hkv, vd = k.shape[2], v.shape[3]
    # the kernels take both states or neither: fill the missing one with zeros
    if with_den and h0 is not None and z0 is None:
        z0 = torch.zeros(b, hkv, kd, device=q.device, dtype=torch.float32)
    if z0 is not None and h0 is None:
        h0 = torch.zeros(b, hkv, kd, vd, device=q.device, dtype=torch.float32)
    o, den, ht, zt = _ChunkLinearAttn.apply(q, k, v, h0, z0, float(scale), bool(with_den), bool(output_final_state))
    return LinearAttnOut(o, den, ht, zt)
