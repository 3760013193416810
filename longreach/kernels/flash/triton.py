"""Triton block attention (forward and backward) with lse out, varlen documents, GQA, and an optional
sparse-sharded (S2) block pattern. One kernel per pass; causal, varlen, GQA packing and sparsity are flags.

Layout (internal): q [Tq, Hq, D], k/v [Tk, Hkv, D] (any strides, last dim contiguous), tokens of all
documents flattened; document ``i`` of q is rows ``cu_q[i]:cu_q[i+1]`` and attends document ``i`` of k,
rows ``cu_k[i]:cu_k[i+1]``. ``causal`` is top-left aligned inside each document pair: key j is visible to
query i iff j <= i (the ring's diagonal block; for self-attention the usual causal mask).
lse is fp32 [Hq, Tq], natural log. A row that sees no key gets out 0 and lse -inf.

GQA: q head h reads kv head h // (Hq // Hkv); KV is never repeated. ``PACK`` q heads of one group are stacked
into the rows of one tile (row r = token r // PACK, head r % PACK), so each loaded K/V tile serves all of them
(S2 uses PACK = group size; dense flash uses PACK = 1 and lets L2 share K/V across a group's programs).

Sparse (S2) pattern, per kv head h, over blocks of ``sp_block`` tokens counted from each document's start:
query block qb sees key block kb <= qb iff qb - kb < sp_window (local window, includes the diagonal),
kb < sp_sink (sink), or kb % s == h % s with s = sp_stride (s = 1 for a dense head). The kernels walk exactly
those blocks (arithmetic, no block table): skipped blocks are never loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class SparseArgs:
    """S2 pattern in kernel units (blocks), see the module docstring."""

    block: int
    window_blocks: int
    sink_blocks: int
    stride: int
    dense_heads: torch.Tensor  # int32 [Hkv], 1 = this kv head is dense


# ----------------------------------------------------------------------------------------------- helpers


@triton.jit
def _shard_stride(DENSE, hkv, sp_stride):
    dense = tl.load(DENSE + hkv)
    return tl.where(dense != 0, 1, sp_stride)


# ----------------------------------------------------------------------------------------------- forward


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, lo, hi, k_len, tok, qk_scale,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        kt_ptrs = k_base + cols[None, :].to(tl.int64) * stride_kt + offs_d[:, None]  # [D, BN]
        v_ptrs = v_base + cols[:, None].to(tl.int64) * stride_vt + offs_d[None, :]  # [BN, D]
        if MASK:
            col_ok = cols < k_len
            kt = tl.load(kt_ptrs, mask=col_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        qk = tl.dot(q, kt)
        if MASK:
            valid = col_ok[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= tok[:, None])
            qk = tl.where(valid, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # a row with nothing visible yet keeps m=-inf; subtract 0 so exp2 gives 0, not nan
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            qk = qk * qk_scale
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = m_new
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, CU_Q, CU_K, DENSE, qk_scale,
              stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
              sp_block, sp_window, sp_sink, sp_stride, TUNE_LEN,
              GROUP: tl.constexpr, PACK: tl.constexpr, CAUSAL: tl.constexpr, SPARSE: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # heaviest (last, for causal) q tiles first: shorter tail
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    doc = tl.program_id(1)
    hp = tl.program_id(2)
    ROWS: tl.constexpr = BLOCK_M // PACK
    q_start = tl.load(CU_Q + doc)
    q_len = tl.load(CU_Q + doc + 1) - q_start
    k_start = tl.load(CU_K + doc)
    k_len = tl.load(CU_K + doc + 1) - k_start
    i0 = pid_m * ROWS
    if i0 < q_len:
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        tok = i0 + offs_m // PACK
        head = hp * PACK + offs_m % PACK
        hkv = (hp * PACK) // GROUP
        row_ok = tok < q_len
        trow = (q_start + tok).to(tl.int64)
        q = tl.load(Q + trow[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        k_base = K + k_start.to(tl.int64) * stride_kt + hkv * stride_kh
        v_base = V + k_start.to(tl.int64) * stride_vt + hkv * stride_vh
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        win_lo = 0
        if SPARSE:
            qb = i0 // sp_block
            lo_wb = tl.maximum(qb - sp_window + 1, 0)
            acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                                       0, tl.minimum(sp_sink, lo_wb) * sp_block, k_len, tok, qk_scale,
                                       False, CAUSAL, BLOCK_N, HEAD_DIM)
            s = _shard_stride(DENSE, hkv, sp_stride)
            first = sp_sink + (hkv % s - sp_sink % s + s) % s
            for kb in range(first, lo_wb, s):
                acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                                           kb * sp_block, (kb + 1) * sp_block, k_len, tok, qk_scale,
                                           False, CAUSAL, BLOCK_N, HEAD_DIM)
            win_lo = lo_wb * sp_block
        if CAUSAL:
            hi = tl.minimum(k_len, i0 + ROWS)
            safe_hi = (tl.minimum(k_len, i0) // BLOCK_N) * BLOCK_N
        else:
            hi = k_len
            safe_hi = (k_len // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                                   win_lo, safe_hi, k_len, tok, qk_scale,
                                   False, CAUSAL, BLOCK_N, HEAD_DIM)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                                   safe_hi, hi, k_len, tok, qk_scale,
                                   True, CAUSAL, BLOCK_N, HEAD_DIM)
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) / 1.4426950408889634)
        tl.store(O + trow[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None])
        tl.store(LSE + head * stride_lh + trow, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------- backward


@triton.jit
def _bwd_delta(O, DO, DELTA, T, stride_ot, stride_oh, stride_dot, stride_doh, stride_dh,
               HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    # delta[h, t] = sum_d out * dout: the softmax-jacobian row term of the backward
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    h = tl.program_id(1)
    d = tl.arange(0, HEAD_DIM)
    ok = t < T
    t64 = t.to(tl.int64)
    o = tl.load(O + t64[:, None] * stride_ot + h * stride_oh + d[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(DO + t64[:, None] * stride_dot + h * stride_doh + d[None, :], mask=ok[:, None], other=0.0)
    tl.store(DELTA + h * stride_dh + t64, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=ok)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, q_start, q_len, head0, lo, hi, cols, qk_scale,
                stride_qt, stride_qh, stride_dot, stride_doh, stride_lh,
                MASK: tl.constexpr, PACK: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    ROWS: tl.constexpr = BLOCK_M // PACK
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    head = head0 + offs_m % PACK
    for start in range(lo, hi, ROWS):
        tok = start + offs_m // PACK
        row_ok = tok < q_len
        trow = (q_start + tok).to(tl.int64)
        q = tl.load(Q + trow[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + trow[:, None] * stride_dot + head[:, None] * stride_doh + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0)
        # rows past the document: lse=+inf makes p exactly 0
        lse = tl.load(LSE + head * stride_lh + trow, mask=row_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + head * stride_lh + trow, mask=row_ok, other=0.0)
        qkT = tl.dot(k, tl.trans(q))  # [BN, BM]
        pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
        if MASK:
            pT = tl.where(cols[:, None] <= tok[None, :], pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv)
        dpT = tl.dot(v, tl.trans(do))
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, DENSE, qk_scale, sm_scale,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                   stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
                   sp_block, sp_window, sp_sink, sp_stride, TUNE_LEN,
                   GROUP: tl.constexpr, PACK: tl.constexpr, CAUSAL: tl.constexpr, SPARSE: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.num_programs(0) - 1 - tl.program_id(0)
    doc = tl.program_id(1)
    hkv = tl.program_id(2)
    ROWS: tl.constexpr = BLOCK_M // PACK
    q_start = tl.load(CU_Q + doc)
    q_len = tl.load(CU_Q + doc + 1) - q_start
    k_start = tl.load(CU_K + doc)
    k_len = tl.load(CU_K + doc + 1) - k_start
    j0 = pid_n * BLOCK_N
    if j0 < k_len:
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        cols = j0 + offs_n
        col_ok = cols < k_len
        krow = (k_start + cols).to(tl.int64)
        k = tl.load(K + krow[:, None] * stride_kt + hkv * stride_kh + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(V + krow[:, None] * stride_vt + hkv * stride_vh + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        q_hi = q_len
        if SPARSE:
            # a key block is seen by the window's query blocks, and by all later ones if it is sink or on-shard
            kb = j0 // sp_block
            s = _shard_stride(DENSE, hkv, sp_stride)
            everyone = (kb < sp_sink) | (kb % s == hkv % s)
            q_hi = tl.where(everyone, q_len, tl.minimum(q_len, (kb + sp_window) * sp_block))
        for g in range(GROUP // PACK):
            head0 = hkv * GROUP + g * PACK
            if CAUSAL:
                mid = tl.minimum(j0 + BLOCK_N, q_hi)
                dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, q_start, q_len, head0, j0, mid, cols,
                                     qk_scale, stride_qt, stride_qh, stride_dot, stride_doh, stride_lh,
                                     True, PACK, BLOCK_M, HEAD_DIM)
                dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, q_start, q_len, head0, mid, q_hi, cols,
                                     qk_scale, stride_qt, stride_qh, stride_dot, stride_doh, stride_lh,
                                     False, PACK, BLOCK_M, HEAD_DIM)
            else:
                dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, q_start, q_len, head0, 0, q_hi, cols,
                                     qk_scale, stride_qt, stride_qh, stride_dot, stride_doh, stride_lh,
                                     False, PACK, BLOCK_M, HEAD_DIM)
        dk = dk * sm_scale
        tl.store(DK + krow[:, None] * stride_dkt + hkv * stride_dkh + offs_d[None, :], dk.to(DK.dtype.element_ty),
                 mask=col_ok[:, None])
        tl.store(DV + krow[:, None] * stride_dvt + hkv * stride_dvh + offs_d[None, :], dv.to(DV.dtype.element_ty),
                 mask=col_ok[:, None])


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, lo, hi, k_len, tok, qk_scale,
              MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        kt_ptrs = k_base + cols[None, :].to(tl.int64) * stride_kt + offs_d[:, None]  # [D, BN]
        vt_ptrs = v_base + cols[None, :].to(tl.int64) * stride_vt + offs_d[:, None]
        if MASK:
            col_ok = cols < k_len
            kt = tl.load(kt_ptrs, mask=col_ok[None, :], other=0.0)
            vt = tl.load(vt_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            vt = tl.load(vt_ptrs)
        qk = tl.dot(q, kt)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASK:
            valid = col_ok[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= tok[:, None])
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, vt)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, DENSE, qk_scale, sm_scale,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                 stride_dqt, stride_dqh, stride_lh,
                 sp_block, sp_window, sp_sink, sp_stride, TUNE_LEN,
                 GROUP: tl.constexpr, PACK: tl.constexpr, CAUSAL: tl.constexpr, SPARSE: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    doc = tl.program_id(1)
    hp = tl.program_id(2)
    ROWS: tl.constexpr = BLOCK_M // PACK
    q_start = tl.load(CU_Q + doc)
    q_len = tl.load(CU_Q + doc + 1) - q_start
    k_start = tl.load(CU_K + doc)
    k_len = tl.load(CU_K + doc + 1) - k_start
    i0 = pid_m * ROWS
    if i0 < q_len:
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        tok = i0 + offs_m // PACK
        head = hp * PACK + offs_m % PACK
        hkv = (hp * PACK) // GROUP
        row_ok = tok < q_len
        trow = (q_start + tok).to(tl.int64)
        q = tl.load(Q + trow[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + trow[:, None] * stride_dot + head[:, None] * stride_doh + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + head * stride_lh + trow, mask=row_ok, other=float("inf"))
        # a row that saw no key (lse=-inf) has zero gradient: +inf gives p=0
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        delta = tl.load(DELTA + head * stride_lh + trow, mask=row_ok, other=0.0)
        k_base = K + k_start.to(tl.int64) * stride_kt + hkv * stride_kh
        v_base = V + k_start.to(tl.int64) * stride_vt + hkv * stride_vh
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        win_lo = 0
        if SPARSE:
            qb = i0 // sp_block
            lo_wb = tl.maximum(qb - sp_window + 1, 0)
            dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt,
                           0, tl.minimum(sp_sink, lo_wb) * sp_block, k_len, tok, qk_scale,
                           False, CAUSAL, BLOCK_N, HEAD_DIM)
            s = _shard_stride(DENSE, hkv, sp_stride)
            first = sp_sink + (hkv % s - sp_sink % s + s) % s
            for kb in range(first, lo_wb, s):
                dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt,
                               kb * sp_block, (kb + 1) * sp_block, k_len, tok, qk_scale,
                               False, CAUSAL, BLOCK_N, HEAD_DIM)
            win_lo = lo_wb * sp_block
        if CAUSAL:
            hi = tl.minimum(k_len, i0 + ROWS)
            safe_hi = (tl.minimum(k_len, i0) // BLOCK_N) * BLOCK_N
        else:
            hi = k_len
            safe_hi = (k_len // BLOCK_N) * BLOCK_N
        dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, win_lo, safe_hi, k_len, tok,
                       qk_scale, False, CAUSAL, BLOCK_N, HEAD_DIM)
        dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, safe_hi, hi, k_len, tok,
                       qk_scale, True, CAUSAL, BLOCK_N, HEAD_DIM)
        dq = dq * sm_scale
        tl.store(DQ + trow[:, None] * stride_dqt + head[:, None] * stride_dqh + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------- tuning

def _cfg(bm, bn, w, s):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)


FWD_CONFIGS = [_cfg(128, 128, 8, 3), _cfg(128, 64, 4, 3), _cfg(128, 64, 8, 3), _cfg(128, 128, 8, 2),
               _cfg(64, 64, 4, 3)]
DQ_CONFIGS = [_cfg(128, 64, 8, 3), _cfg(128, 32, 4, 4), _cfg(64, 64, 4, 3), _cfg(128, 64, 4, 3),
              _cfg(128, 128, 8, 2)]
DKDV_CONFIGS = [_cfg(64, 128, 8, 3), _cfg(32, 128, 4, 4), _cfg(64, 64, 4, 3), _cfg(64, 128, 4, 3),
                _cfg(64, 128, 8, 2), _cfg(128, 128, 8, 2)]
# the interpreter would run every config: one small tile of 16 tokens (x packed heads) instead
INTERP_TOKENS = 32

_TUNE_KEY = ["HEAD_DIM", "GROUP", "PACK", "CAUSAL", "SPARSE", "TUNE_LEN"]


def _prune(rows_divide_kv: bool):
    """Drop configs that cannot tile the sparse block or (backward dk/dv) the causal diagonal."""

    def prune(configs, named_args, **kwargs):
        pack = kwargs.get("PACK", named_args.get("PACK", 1))
        sparse = kwargs.get("SPARSE", named_args.get("SPARSE", False))
        block = named_args["sp_block"]
        keep = []
        for c in configs:
            bq, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            rows = bq // pack
            if bq % pack or rows < 1:
                continue
            if rows_divide_kv and bk % rows:
                continue
            if sparse and (block % bk or block % rows):
                continue
            keep.append(c)
        if not keep:
            raise ValueError(f"no kernel tile fits sparse block={block} with {pack} packed heads; "
                             "use a block that is a multiple of 128")
        return keep

    return prune


_fwd_tuned = triton.autotune(FWD_CONFIGS, key=_TUNE_KEY,
                             prune_configs_by={"early_config_prune": _prune(False)})(_attn_fwd)
_dq_tuned = triton.autotune(DQ_CONFIGS, key=_TUNE_KEY,
                            prune_configs_by={"early_config_prune": _prune(False)})(_attn_bwd_dq)
_dkdv_tuned = triton.autotune(DKDV_CONFIGS, key=_TUNE_KEY,
                              prune_configs_by={"early_config_prune": _prune(True)})(_attn_bwd_dkdv)


def _launch(tuned, raw, grid, args, kwargs, sp_block: int):
    if INTERPRET:
        tokens = INTERP_TOKENS if sp_block % INTERP_TOKENS == 0 else 16
        raw[grid](*args, **kwargs, BLOCK_M=tokens * kwargs["PACK"], BLOCK_N=tokens)
    else:
        tuned[grid](*args, **kwargs)


def _tune_len(n: int) -> int:
    return 1 << max(int(n) - 1, 1).bit_length()


def _sparse_args(sparse: Optional[SparseArgs], device) -> tuple:
    if sparse is None:
        return torch.zeros(1, dtype=torch.int32, device=device), (128, 1, 0, 1)
    return sparse.dense_heads, (sparse.block, sparse.window_blocks, sparse.sink_blocks, sparse.stride)


# ----------------------------------------------------------------------------------------------- drivers


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                      max_q: int, *, causal: bool, scale: float, out_dtype: torch.dtype,
                      sparse: Optional[SparseArgs] = None, pack: int = 1,
                      out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [Tq, Hq, D], k/v [Tk, Hkv, D], cu_q/cu_k int32 [n_docs+1] -> (out [Tq, Hq, D] out_dtype, lse fp32 [Hq, Tq])."""
    tq, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    if INTERPRET:  # the interpreter's bf16 dot is wrong (triton-lang/triton#11584): same kernel on fp32 copies
        q, k, v = q.float(), k.float(), v.float()
    if out is None:
        out = torch.empty((tq, hq, d), dtype=out_dtype, device=q.device)
    lse = torch.empty((hq, tq), dtype=torch.float32, device=q.device)
    dense, (spb, spw, sps, spst) = _sparse_args(sparse, q.device)
    n_docs = cu_q.numel() - 1

    def grid(meta):
        return (triton.cdiv(max_q, meta["BLOCK_M"] // pack), n_docs, hq // pack)

    args = (q, k, v, out, lse, cu_q, cu_k, dense, scale * LOG2E,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), lse.stride(0), spb, spw, sps, spst, _tune_len(max_q))
    kw = dict(GROUP=group, PACK=pack, CAUSAL=causal, SPARSE=sparse is not None, HEAD_DIM=d)
    _launch(_fwd_tuned, _attn_fwd, grid, args, kw, spb)
    return out, lse


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int, *,
                       causal: bool, scale: float, grad_dtype: Optional[torch.dtype] = None,
                       sparse: Optional[SparseArgs] = None, pack: int = 1,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of softmax attention given the (final) out and lse. Shapes as in ``attention_forward``;
    dq/dk/dv come back in ``grad_dtype`` (default: the input dtypes)."""
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    group = hq // hkv
    dq = torch.empty((tq, hq, d), dtype=grad_dtype or q.dtype, device=q.device)
    dk = torch.empty((tk, hkv, d), dtype=grad_dtype or k.dtype, device=q.device)
    dv = torch.empty((tk, hkv, d), dtype=grad_dtype or v.dtype, device=q.device)
    if INTERPRET:  # see attention_forward
        q, k, v = q.float(), k.float(), v.float()
    delta = torch.empty_like(lse)
    if do.stride(-1) != 1:
        do = do.contiguous()
    blk = 64
    _bwd_delta[(triton.cdiv(tq, blk), hq)](out, do, delta, tq, out.stride(0), out.stride(1), do.stride(0),
                                           do.stride(1), delta.stride(0), HEAD_DIM=d, BLOCK=blk)
    # the dots take dout in the operands' dtype (the ring may hand an fp32 one); delta above used it as given
    do = do.to(q.dtype)
    dense, (spb, spw, sps, spst) = _sparse_args(sparse, q.device)
    n_docs = cu_q.numel() - 1
    kw = dict(GROUP=group, PACK=pack, CAUSAL=causal, SPARSE=sparse is not None, HEAD_DIM=d)
    sp = (spb, spw, sps, spst)

    def grid_kv(meta):
        return (triton.cdiv(max_k, meta["BLOCK_N"]), n_docs, hkv)

    _launch(_dkdv_tuned, _attn_bwd_dkdv, grid_kv,
            (q, k, v, do, lse, delta, dk, dv, cu_q, cu_k, dense, scale * LOG2E, scale,
             q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
             dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0), *sp, _tune_len(max_k)), kw, spb)

    def grid_q(meta):
        return (triton.cdiv(max_q, meta["BLOCK_M"] // pack), n_docs, hq // pack)

    _launch(_dq_tuned, _attn_bwd_dq, grid_q,
            (q, k, v, do, lse, delta, dq, cu_q, cu_k, dense, scale * LOG2E, scale,
             q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
             dq.stride(0), dq.stride(1), lse.stride(0), *sp, _tune_len(max_q)), kw, spb)
    return dq, dk, dv
