"""Triton block attention (forward and backward) with lse out, varlen documents, GQA, and an optional
sparse-sharded (S2) block pattern. Causal, varlen, GQA packing and sparsity are flags of one set of kernels.

Layout (internal): q [Tq, Hq, D], k/v [Tk, Hkv, D] (any strides, last dim contiguous), tokens of all
documents flattened; document ``i`` of q is rows ``cu_q[i]:cu_q[i+1]`` and attends document ``i`` of k,
rows ``cu_k[i]:cu_k[i+1]``. ``causal`` is top-left aligned inside each document pair: key j is visible to
query i iff j <= i (the ring's diagonal block; for self-attention the usual causal mask).
lse is fp32 [Hq, Tq], natural log. A row that sees no key gets out 0 and lse -inf.

GQA: q head h reads kv head h // (Hq // Hkv); KV is never repeated. ``PACK`` q heads of one group are stacked
into the rows of one tile (row r = token r // PACK, head r % PACK), so each loaded K/V tile serves all of them
(S2 uses PACK = group size; dense flash uses PACK = 1: the programs of a group's heads are launched next to
each other, so they share K/V through L2).

Sparse (S2) pattern, per kv head h, over blocks of ``sp_block`` tokens counted from each document's start:
query block qb sees key block kb <= qb iff qb - kb < sp_window (local window, includes the diagonal),
kb < sp_sink (sink), or kb % s == h % s with s = sp_stride (s = 1 for a dense head). The kernels walk exactly
those blocks (arithmetic, no block table) in ONE flat loop (sink, shard, window tiles), so the loop pipelines
like the dense one; skipped blocks are never loaded.

On Hopper the forward hands off to the warp-specialised Gluon kernel of ``gluon_sm90.py`` (same contract, same
results; ``GLUON_FWD``) where it applies; this Triton forward runs everywhere else and under the interpreter.

Speed notes (H100): only the causal diagonal tiles and a document's last partial tile are masked; every
grid puts the heads of a tile next to each other and the heaviest tiles first (short tail, K/V shared in L2);
the backward runs dk/dv per KV tile (the GQA group's q heads packed into the q tile rows, so each KV tile is
loaded once) and dq per q tile, as two launches or (``FUSED_BWD``) as the two halves of one; the backward's
streamed tiles (q/dout in dk/dv, K/V in dq) come by TMA tensor-descriptor loads on Hopper and in the interpreter
(``BWD_TMA``; per-thread pointer loads elsewhere, same results bit for bit). Tiles per kernel are fixed from a
sweep (``longreach/launch/bench/flash_sweep.py``, see ``TILES``), no autotune: no tuning time at a new length,
and no autotuner noise picking a slower config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer loads only
    _TensorDescriptor = None

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


@triton.jit
def _idx(x, IDX64: tl.constexpr):
    # token offsets inside a document: int32 unless tokens * row stride may pass 2^31
    if IDX64:
        return x.to(tl.int64)
    else:
        return x


@triton.jit
def _sparse_walk(i0, hkv, DENSE, sp_block, sp_window, sp_sink, sp_stride, BLOCK_N: tl.constexpr):
    """Flat walk of the off-window blocks of query block i0 // sp_block, in tiles of BLOCK_N:
    -> (n_sink tiles, n_shard tiles, first shard block, shard stride, window start token)."""
    qb = i0 // sp_block
    lo_wb = tl.maximum(qb - sp_window + 1, 0)
    tpb = sp_block // BLOCK_N
    s = _shard_stride(DENSE, hkv, sp_stride)
    first = sp_sink + (hkv % s - sp_sink % s + s) % s
    n_shard = tl.where(lo_wb > first, (lo_wb - first + s - 1) // s, 0)
    return tl.minimum(sp_sink, lo_wb) * tpb, n_shard * tpb, first, s, lo_wb * sp_block


@triton.jit
def _tile_start(t, lo, n_sink, n_shard, first, s, sp_block, SPARSE_WALK: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key column where flat iteration t starts: sink tiles, then the shard's tiles, then lo + ... (window)."""
    if SPARSE_WALK:
        tpb = sp_block // BLOCK_N
        u = tl.maximum(t - n_sink, 0)
        shard = (first + (u // tpb) * s) * sp_block + (u % tpb) * BLOCK_N
        win = lo + (u - n_shard) * BLOCK_N
        return tl.where(t < n_sink, t * BLOCK_N, tl.where(u < n_shard, shard, win))
    else:
        return lo + t * BLOCK_N


# ----------------------------------------------------------------------------------------------- forward
# Lengths and pattern sizes are not specialized (do_not_specialize): one compile serves every sequence length.


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, lo, n_iter, n_sink, n_shard, first, s,
               sp_block, k_len, tok, qk_scale,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, SPARSE_WALK: tl.constexpr, IDX64: tl.constexpr,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for t in range(0, n_iter):
        start = _tile_start(t, lo, n_sink, n_shard, first, s, sp_block, SPARSE_WALK, BLOCK_N)
        cols = start + offs_n
        c = _idx(cols, IDX64)
        kt_ptrs = k_base + c[None, :] * stride_kt + offs_d[:, None]  # [D, BN]
        v_ptrs = v_base + c[:, None] * stride_vt + offs_d[None, :]  # [BN, D]
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
            p = tl.math.exp2(qk - m_use[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = m_new
            p = tl.math.exp2(qk * qk_scale - m_use[:, None])  # one FMA per score
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=['N_TILES', 'N_HP', 'sp_block', 'sp_window', 'sp_sink', 'sp_stride'])
def _attn_fwd(Q, K, V, O, LSE, CU_Q, CU_K, DENSE, qk_scale,
              stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
              sp_block, sp_window, sp_sink, sp_stride, N_TILES, N_HP,
              GROUP: tl.constexpr, PACK: tl.constexpr, CAUSAL: tl.constexpr, SPARSE: tl.constexpr,
              IDX64: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              ACC: tl.constexpr = False):
    # ACC: O/LSE hold a running fp32 (out, lse) (the ring's accumulators) that this block merges into in place
    # heads of a tile side by side (GQA heads share K/V in L2), heaviest (last, for causal) tiles first
    pid = tl.program_id(0)
    hp = pid % N_HP
    pid_m = N_TILES - 1 - pid // N_HP
    doc = tl.program_id(1)
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
        q_base = Q + q_start.to(tl.int64) * stride_qt
        t = _idx(tok, IDX64)
        q = tl.load(q_base + t[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        k_base = K + k_start.to(tl.int64) * stride_kt + hkv * stride_kh
        v_base = V + k_start.to(tl.int64) * stride_vt + hkv * stride_vh
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        if CAUSAL:
            hi = tl.minimum(k_len, i0 + ROWS)
            safe_hi = (tl.minimum(k_len, i0) // BLOCK_N) * BLOCK_N
        else:
            hi = k_len
            safe_hi = (k_len // BLOCK_N) * BLOCK_N
        if SPARSE:
            n_sink, n_shard, first, s, lo = _sparse_walk(i0, hkv, DENSE, sp_block, sp_window, sp_sink, sp_stride,
                                                         BLOCK_N)
            n_full = n_sink + n_shard + tl.maximum(safe_hi - lo, 0) // BLOCK_N
        else:
            n_sink, n_shard, first, s, lo = 0, 0, 0, 1, 0
            n_full = safe_hi // BLOCK_N
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                                   lo, n_full, n_sink, n_shard, first, s, sp_block, k_len, tok, qk_scale,
                                   False, CAUSAL, SPARSE, IDX64, BLOCK_N, HEAD_DIM)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                                   safe_hi, tl.cdiv(hi - safe_hi, BLOCK_N), 0, 0, 0, 1, sp_block, k_len, tok,
                                   qk_scale, True, CAUSAL, False, IDX64, BLOCK_N, HEAD_DIM)
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) / 1.4426950408889634)
        o_base = O + q_start.to(tl.int64) * stride_ot
        o_ptrs = o_base + t[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        lse_ptrs = LSE + head * stride_lh + q_start + tok
        if ACC:  # out = w_prev out_prev + w_blk out_blk with weights exp(lse_x - logaddexp(lse_prev, lse_blk))
            lse_prev = tl.load(lse_ptrs, mask=row_ok, other=float("-inf"))
            o_prev = tl.load(o_ptrs, mask=row_ok[:, None], other=0.0)
            mx = tl.maximum(lse_prev, lse)
            mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
            w_prev = tl.exp(lse_prev - mx_safe)
            w_blk = tl.exp(lse - mx_safe)
            tot = w_prev + w_blk
            tot_safe = tl.where(tot == 0.0, 1.0, tot)
            out = (o_prev * (w_prev / tot_safe)[:, None] + out * (w_blk / tot_safe)[:, None])
            lse = tl.where(tot == 0.0, float("-inf"), mx_safe + tl.log(tot_safe))
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
        tl.store(lse_ptrs, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------- backward


@triton.jit
def _bwd_delta(O, DO, DELTA, T, stride_ot, stride_oh, stride_dot, stride_doh, stride_dh,
               HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, LSE=None, LSE2=None):
    # delta[h, t] = sum_d out * dout: the softmax-jacobian row term of the backward. With LSE2 (the Gluon dk/dv
    # kernel's form, same strides as DELTA and LSE): lse2 = lse * log2(e), -inf (a row that saw no key) -> +inf
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    h = tl.program_id(1)
    d = tl.arange(0, HEAD_DIM)
    ok = t < T
    t64 = t.to(tl.int64)
    o = tl.load(O + t64[:, None] * stride_ot + h * stride_oh + d[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(DO + t64[:, None] * stride_dot + h * stride_doh + d[None, :], mask=ok[:, None], other=0.0)
    tl.store(DELTA + h * stride_dh + t64, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=ok)
    if LSE2 is not None:
        lse = tl.load(LSE + h * stride_dh + t64, mask=ok, other=0.0)
        tl.store(LSE2 + h * stride_dh + t64, tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634),
                 mask=ok)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, q_len, head, lo, hi, j0, qk_scale,
                stride_qt, stride_qh, stride_dot, stride_doh, dq_base, stride_dqt, stride_dqh, sm_scale,
                QD, DOD, q_row0, head0, stride_lh,
                MASK_CAUSAL: tl.constexpr, MASK_ROWS: tl.constexpr, IDX64: tl.constexpr, PACK: tl.constexpr,
                BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, ATOMIC_DQ: tl.constexpr, TMA: tl.constexpr):
    # TMA: q/dout tiles come by tensor-descriptor loads (QD/DOD over [Tq, Hq, D], box [ROWS, PACK, D] at document
    # row q_row0 + start, head head0); rows past the document then hold the next document's values (or zeros at
    # the end), which lse=+inf turns into p = 0 exactly as the masked loads' zeros
    ROWS: tl.constexpr = BLOCK_M // PACK
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    for start in range(lo, hi, ROWS):
        tok = start + offs_m // PACK
        t = _idx(tok, IDX64)
        q_ptrs = q_base + t[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
        do_ptrs = do_base + t[:, None] * stride_dot + head[:, None] * stride_doh + offs_d[None, :]
        row_ok = tok < q_len
        if TMA:
            q = QD.load([q_row0 + start, head0, 0]).reshape(BLOCK_M, HEAD_DIM)
            do = DOD.load([q_row0 + start, head0, 0]).reshape(BLOCK_M, HEAD_DIM)
        elif MASK_ROWS:
            q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
        else:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
        rowoff = (head0 + offs_m % PACK) * stride_lh + tok
        if MASK_ROWS:  # rows past the document: lse=+inf makes p exactly 0
            lse = tl.load(lse_base + rowoff, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_base + rowoff, mask=row_ok, other=0.0)
        else:
            lse = tl.load(lse_base + rowoff)
            delta = tl.load(delta_base + rowoff)
        qkT = tl.dot(k, tl.trans(q))  # [BN, BM]
        pT = tl.math.exp2(qkT * qk_scale - (lse * 1.4426950408889634)[None, :])
        if MASK_CAUSAL:
            cols = j0 + tl.arange(0, k.shape[0])
            pT = tl.where(cols[:, None] <= tok[None, :], pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv)
        dpT = tl.dot(v, tl.trans(do))
        dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
        dk = tl.dot(dsT, q, dk)
        if ATOMIC_DQ:
            # this KV tile's share of dq, added into the fp32 dq buffer (no separate dq pass)
            dq = tl.dot(tl.trans(dsT), k) * sm_scale
            dq_ptrs = dq_base + t[:, None] * stride_dqt + head[:, None] * stride_dqh + offs_d[None, :]
            if MASK_ROWS:
                tl.atomic_add(dq_ptrs, dq, mask=row_ok[:, None], sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq, sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_body(pid, Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, DENSE, qk_scale, sm_scale,
               stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
               stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
               sp_block, sp_window, sp_sink, sp_stride, N_KV, DQ, stride_dqt, stride_dqh, QD, DOD,
               GROUP: tl.constexpr, PACK: tl.constexpr, CAUSAL: tl.constexpr, SPARSE: tl.constexpr,
               IDX64: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, ATOMIC_DQ: tl.constexpr, ACC: tl.constexpr, TMA: tl.constexpr):
    # kv heads of a tile side by side; first tiles first (for causal they see the most queries)
    hkv = pid % N_KV
    pid_n = pid // N_KV
    doc = tl.program_id(1)
    ROWS: tl.constexpr = BLOCK_M // PACK
    q_start = tl.load(CU_Q + doc)
    q_len = tl.load(CU_Q + doc + 1) - q_start
    k_start = tl.load(CU_K + doc)
    k_len = tl.load(CU_K + doc + 1) - k_start
    j0 = pid_n * BLOCK_N
    if j0 < k_len:
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_m = tl.arange(0, BLOCK_M)
        cols = j0 + offs_n
        col_ok = cols < k_len
        c = _idx(cols, IDX64)
        k_base = K + k_start.to(tl.int64) * stride_kt + hkv * stride_kh
        v_base = V + k_start.to(tl.int64) * stride_vt + hkv * stride_vh
        k = tl.load(k_base + c[:, None] * stride_kt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + c[:, None] * stride_vt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        q_hi = q_len
        if SPARSE:
            # a key block is seen by the window's query blocks, and by all later ones if it is sink or on-shard
            kb = j0 // sp_block
            s = _shard_stride(DENSE, hkv, sp_stride)
            everyone = (kb < sp_sink) | (kb % s == hkv % s)
            q_hi = tl.where(everyone, q_len, tl.minimum(q_len, (kb + sp_window) * sp_block))
        q_base = Q + q_start.to(tl.int64) * stride_qt
        do_base = DO + q_start.to(tl.int64) * stride_dot
        dq_base = DQ + q_start.to(tl.int64) * stride_dqt
        if CAUSAL:
            mid = tl.minimum(j0 + BLOCK_N, q_hi)
            lo = mid
        else:
            mid = 0
            lo = 0
        full_hi = lo + (tl.maximum(q_hi - lo, 0) // ROWS) * ROWS
        for g in range(GROUP // PACK):
            head0 = hkv * GROUP + g * PACK
            head = head0 + offs_m % PACK
            lse_base = LSE + q_start  # + (head * stride_lh + token) per row, in the loop
            delta_base = DELTA + q_start
            if CAUSAL:  # the diagonal: causal mask (and rows past the document)
                dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, q_len, head, j0, mid,
                                     j0, qk_scale, stride_qt, stride_qh, stride_dot, stride_doh,
                                     dq_base, stride_dqt, stride_dqh, sm_scale, QD, DOD, q_start, head0, stride_lh,
                                     True, True, IDX64, PACK, BLOCK_M, HEAD_DIM, ATOMIC_DQ, TMA)
            dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, q_len, head, lo, full_hi,
                                 j0, qk_scale, stride_qt, stride_qh, stride_dot, stride_doh,
                                 dq_base, stride_dqt, stride_dqh, sm_scale, QD, DOD, q_start, head0, stride_lh,
                                 False, False, IDX64, PACK, BLOCK_M, HEAD_DIM, ATOMIC_DQ, TMA)
            dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, q_len, head, full_hi, q_hi,
                                 j0, qk_scale, stride_qt, stride_qh, stride_dot, stride_doh,
                                 dq_base, stride_dqt, stride_dqh, sm_scale, QD, DOD, q_start, head0, stride_lh,
                                 False, True, IDX64, PACK, BLOCK_M, HEAD_DIM, ATOMIC_DQ, TMA)
        dk = dk * sm_scale
        # key offsets recomputed, not kept live through the loops (registers)
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < k_len
        c = _idx(cols, IDX64)
        dk_base = DK + k_start.to(tl.int64) * stride_dkt + hkv * stride_dkh
        dv_base = DV + k_start.to(tl.int64) * stride_dvt + hkv * stride_dvh
        dk_ptrs = dk_base + c[:, None] * stride_dkt + offs_d[None, :]
        dv_ptrs = dv_base + c[:, None] * stride_dvt + offs_d[None, :]
        if ACC:  # add into the caller's fp32 accumulators (the ring's dK/dV of this KV block)
            dk += tl.load(dk_ptrs, mask=col_ok[:, None], other=0.0)
            dv += tl.load(dv_ptrs, mask=col_ok[:, None], other=0.0)
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, lo, n_iter, n_sink, n_shard, first, s,
              sp_block, k_len, tok, qk_scale, KD, VD, k_row0, hkv,
              MASK: tl.constexpr, CAUSAL: tl.constexpr, SPARSE_WALK: tl.constexpr, IDX64: tl.constexpr,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, TMA: tl.constexpr):
    # TMA: K/V tiles by tensor-descriptor loads (KD/VD over [Tk, Hkv, D], box [BLOCK_N, 1, D]); keys past the
    # document (the next document's, or zeros at the end) are masked to p = 0 like the masked loads' zeros
    offs_n = tl.arange(0, BLOCK_N)
    for t in range(0, n_iter):
        start = _tile_start(t, lo, n_sink, n_shard, first, s, sp_block, SPARSE_WALK, BLOCK_N)
        cols = start + offs_n
        if TMA:
            kk = KD.load([k_row0 + start, hkv, 0]).reshape(BLOCK_N, HEAD_DIM)
            vv = VD.load([k_row0 + start, hkv, 0]).reshape(BLOCK_N, HEAD_DIM)
        else:
            kk, vv = _kv_tile_ptr(k_base, v_base, stride_kt, stride_vt, cols, k_len, MASK, IDX64, HEAD_DIM)
        qk = tl.dot(q, tl.trans(kk))
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASK:
            valid = (cols < k_len)[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= tok[:, None])
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, tl.trans(vv))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kk.dtype), kk, dq)
    return dq


@triton.jit
def _kv_tile_ptr(k_base, v_base, stride_kt, stride_vt, cols, k_len, MASK: tl.constexpr, IDX64: tl.constexpr,
                 HEAD_DIM: tl.constexpr):
    # K/V tiles [BN, D] by pointer loads (zeros past the document when MASK)
    offs_d = tl.arange(0, HEAD_DIM)
    c = _idx(cols, IDX64)
    k_ptrs = k_base + c[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = v_base + c[:, None] * stride_vt + offs_d[None, :]
    if MASK:
        col_ok = cols < k_len
        k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    return k, v


@triton.jit
def _dq_body(pid, Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, DENSE, qk_scale, sm_scale,
             stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
             stride_dqt, stride_dqh, stride_lh,
             sp_block, sp_window, sp_sink, sp_stride, N_TILES, N_HP, KD, VD,
             GROUP: tl.constexpr, PACK: tl.constexpr, CAUSAL: tl.constexpr, SPARSE: tl.constexpr,
             IDX64: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             ACC: tl.constexpr, TMA: tl.constexpr):
    hp = pid % N_HP
    pid_m = N_TILES - 1 - pid // N_HP
    doc = tl.program_id(1)
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
        t = _idx(tok, IDX64)
        q = tl.load(Q + q_start.to(tl.int64) * stride_qt + t[:, None] * stride_qt + head[:, None] * stride_qh
                    + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + q_start.to(tl.int64) * stride_dot + t[:, None] * stride_dot + head[:, None] * stride_doh
                     + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + head * stride_lh + q_start + tok, mask=row_ok, other=float("inf"))
        # a row that saw no key (lse=-inf) has zero gradient: +inf gives p=0
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        delta = tl.load(DELTA + head * stride_lh + q_start + tok, mask=row_ok, other=0.0)
        k_base = K + k_start.to(tl.int64) * stride_kt + hkv * stride_kh
        v_base = V + k_start.to(tl.int64) * stride_vt + hkv * stride_vh
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        if CAUSAL:
            hi = tl.minimum(k_len, i0 + ROWS)
            safe_hi = (tl.minimum(k_len, i0) // BLOCK_N) * BLOCK_N
        else:
            hi = k_len
            safe_hi = (k_len // BLOCK_N) * BLOCK_N
        if SPARSE:
            n_sink, n_shard, first, s, lo = _sparse_walk(i0, hkv, DENSE, sp_block, sp_window, sp_sink, sp_stride,
                                                         BLOCK_N)
            n_full = n_sink + n_shard + tl.maximum(safe_hi - lo, 0) // BLOCK_N
        else:
            n_sink, n_shard, first, s, lo = 0, 0, 0, 1, 0
            n_full = safe_hi // BLOCK_N
        dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, lo, n_full, n_sink, n_shard,
                       first, s, sp_block, k_len, tok, qk_scale, KD, VD, k_start, hkv,
                       False, CAUSAL, SPARSE, IDX64, BLOCK_N, HEAD_DIM, TMA)
        dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, safe_hi,
                       tl.cdiv(hi - safe_hi, BLOCK_N), 0, 0, 0, 1, sp_block, k_len, tok, qk_scale,
                       KD, VD, k_start, hkv, True, CAUSAL, False, IDX64, BLOCK_N, HEAD_DIM, TMA)
        dq = dq * sm_scale
        dq_ptrs = (DQ + q_start.to(tl.int64) * stride_dqt + t[:, None] * stride_dqt + head[:, None] * stride_dqh
                   + offs_d[None, :])
        if ACC:
            dq += tl.load(dq_ptrs, mask=row_ok[:, None], other=0.0)
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit(do_not_specialize=['N_HP', 'N_KV', 'N_KV_PROG', 'N_QTILES', 'sp_block', 'sp_window', 'sp_sink',
                               'sp_stride'])
def _attn_bwd(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, CU_Q, CU_K, DENSE, qk_scale, sm_scale,
              stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
              stride_dqt, stride_dqh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
              sp_block, sp_window, sp_sink, sp_stride, N_KV_PROG, N_KV, N_QTILES, N_HP,
              GROUP: tl.constexpr, PACK: tl.constexpr, CAUSAL: tl.constexpr, SPARSE: tl.constexpr,
              IDX64: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr,
              BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr, ACC: tl.constexpr = False):
    # one launch, two halves: programs [0, N_KV_PROG) do dk/dv per KV tile, the rest dq per q tile; the dq
    # programs are dispatched as the dk/dv ones drain, so neither pass leaves a tail of idle SMs
    pid = tl.program_id(0)
    if pid < N_KV_PROG:
        _dkdv_body(pid, Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, DENSE, qk_scale, sm_scale,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                   stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
                   sp_block, sp_window, sp_sink, sp_stride, N_KV, DQ, stride_dqt, stride_dqh, Q, DO,
                   GROUP, PACK, CAUSAL, SPARSE, IDX64, HEAD_DIM, BLOCK_M1, BLOCK_N1, False, ACC, False)
    else:
        _dq_body(pid - N_KV_PROG, Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, DENSE, qk_scale, sm_scale,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                 stride_dqt, stride_dqh, stride_lh,
                 sp_block, sp_window, sp_sink, sp_stride, N_QTILES, N_HP, K, V,
                 GROUP, PACK, CAUSAL, SPARSE, IDX64, HEAD_DIM, BLOCK_M2, BLOCK_N2, ACC, False)


@triton.jit(do_not_specialize=['N_KV', 'sp_block', 'sp_window', 'sp_sink', 'sp_stride'])
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, DENSE, qk_scale, sm_scale,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                   stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
                   sp_block, sp_window, sp_sink, sp_stride, N_KV, DQ, stride_dqt, stride_dqh, QD, DOD,
                   GROUP: tl.constexpr, PACK: tl.constexpr, CAUSAL: tl.constexpr, SPARSE: tl.constexpr,
                   IDX64: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, ATOMIC_DQ: tl.constexpr, ACC: tl.constexpr = False,
                   TMA: tl.constexpr = False):
    # ATOMIC_DQ: DQ is an fp32 buffer [Tq, Hq, D] (zeroed) that receives every KV tile's share of dq
    # TMA: QD/DOD are tensor descriptors of q/dout (else unused)
    _dkdv_body(tl.program_id(0), Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, DENSE, qk_scale, sm_scale,
               stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
               stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
               sp_block, sp_window, sp_sink, sp_stride, N_KV, DQ, stride_dqt, stride_dqh, QD, DOD,
               GROUP, PACK, CAUSAL, SPARSE, IDX64, HEAD_DIM, BLOCK_M, BLOCK_N, ATOMIC_DQ, ACC, TMA)


@triton.jit(do_not_specialize=['N_HP', 'N_QTILES', 'sp_block', 'sp_window', 'sp_sink', 'sp_stride'])
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, DENSE, qk_scale, sm_scale,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                 stride_dqt, stride_dqh, stride_lh,
                 sp_block, sp_window, sp_sink, sp_stride, N_QTILES, N_HP, KD, VD,
                 GROUP: tl.constexpr, PACK: tl.constexpr, CAUSAL: tl.constexpr, SPARSE: tl.constexpr,
                 IDX64: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, ACC: tl.constexpr = False, TMA: tl.constexpr = False):
    # TMA: KD/VD are tensor descriptors of k/v (else unused)
    _dq_body(tl.program_id(0), Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, DENSE, qk_scale, sm_scale,
             stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
             stride_dqt, stride_dqh, stride_lh,
             sp_block, sp_window, sp_sink, sp_stride, N_QTILES, N_HP, KD, VD,
             GROUP, PACK, CAUSAL, SPARSE, IDX64, HEAD_DIM, BLOCK_M, BLOCK_N, ACC, TMA)


# ----------------------------------------------------------------------------------------------- tiles


@dataclass(frozen=True)
class Tile:
    """One kernel's launch config: BLOCK_M (q rows = tokens x packed heads), BLOCK_N (keys), warps, stages."""

    m: int
    n: int
    warps: int
    stages: int


# From the H100 sweeps (bf16, D=128, 32 q / 8 kv heads, 32K; longreach/launch/bench/flash_sweep.py), keyed by
# (kernel, sparse). 32K causal: fwd 128x128 17.1 ms vs 128x64 17.3, 128x64/4 warps 29.8 (spills); dk/dv 64x128
# 8 warps 3 stages best (2 stages +4%, 4 warps or 128x128 2.3x slower: register spills); dq 128x64 ~ 128x128.
# Re-swept on the H200 with the TMA backward (bench/experiments/tiles, bench/results/tiles_tma_h200_2026-12-02.json):
# 4 stages for dense dk/dv and for dq, 1% faster at 32K and 128K (A/B alternated); the forward stays.
TILES: dict = {
    ("fwd", False): Tile(128, 128, 8, 3),
    ("fwd", True): Tile(128, 128, 8, 3),
    ("dkdv", False): Tile(64, 128, 8, 4),
    ("dkdv", True): Tile(64, 128, 8, 3),
    ("dq", False): Tile(128, 64, 8, 4),
    ("dq", True): Tile(128, 64, 8, 4),
    ("dkdv_atomic", False): Tile(64, 128, 8, 2),
    ("dkdv_atomic", True): Tile(64, 128, 8, 2),
}
# dk/dv and dq as two halves of one launch (warps/stages from the dk/dv tile): measured equal to two launches
# (32K: 56.6 vs 55.8 ms dense, 14.1 vs 14.1 S2), and one fused variant (dq tile 128x128) computed wrong
# gradients on the H100 (Triton 3.6, heavy spills), so two launches stay the default
FUSED_BWD = {False: False, True: False}
# dq without its own pass: every dk/dv program adds its KV tile's share of dq (ds k) into an fp32 buffer with
# atomics (5 matmuls per tile pair instead of 7, as FlashAttention-2/3's backward)
ATOMIC_DQ = {False: False, True: False}
# the dense backward packs the GQA group into the tile rows (as S2 does): the group loop inside dk/dv then has
# one trip, and register spills fall from ~400 to ~50 (32K: 55.8 vs 57.1 ms)
BWD_PACK_DENSE = True
# the backward's streamed tiles (q/dout in dk/dv, K/V in dq) by TMA descriptor loads instead of per-thread
# pointers: dk/dv spills 236 -> 100 B (scripts/kernel_stats.py); H200 backward, dense 128K 960 -> 876 ms, 32K
# 56.0 -> 55.5, S2 -3-4% (bench/results/flash_bwd_tma_onoff_h200_2026-12-01.json)
BWD_TMA = True
# the forward on Hopper (sm_90, 16-bit, D 64/128) runs the warp-specialised Gluon kernel of gluon_sm90.py (dense
# 32K 15.0 vs 17.4 ms, S2 3.8 vs 4.4 on the H200); this Triton kernel everywhere else (and under the interpreter)
GLUON_FWD = True
# the backward's dk/dv half on Hopper likewise runs the Gluon kernel of gluon_sm90_bwd.py (delta + dk/dv, dense 32K
# 28.3 vs 33.5 ms, 128K 456 vs 534, S2 32K 7.6 vs 8.6 on the H200); dq stays this module's kernel. Backward: dense
# 32K 48.8 vs 54.1 ms, 128K 779 vs 862 (bench/results/gluon_bwd_ab_h200_2026-12-02.json)
GLUON_BWD = True
# dq added into an fp32 buffer by the Gluon dk/dv kernel through TMA reduce-adds (5 matmuls per tile pair, not 7;
# FlashAttention-3's split of dq's columns between the two consumers). H200 backward, dense: 8K 3.02 vs 3.21 ms
# (Gluon dk/dv + Triton dq), 32K 45.2 vs 48.9; one launch over 128K 943 vs 787: the reduce-adds miss L2 (with a plain
# dq store 850, without dq 655; bench/results/gluon_bwd_sweep_dqout_h200_2026-12-02.json). So a sequence whose fp32
# dq exceeds FUSED_DQ_MAX_BYTES runs its q rows in chunks of FUSED_DQ_CHUNK_BYTES (at most FUSED_DQ_MAX_BYTES), one
# launch each, dk/dv summed in fp32: the CTAs of a launch sweep the same q rows together (128K 718 vs 783 ms;
# gluon_bwd_sweep_chunk_h200_2026-12-02.json). Dense 128K forward+backward by chunk, three fresh processes, rounds
# alternated (bench/results/gluon_bwd_proc_var_{0,1,2}_h200_2026-12-04.json): 2^27 B (8K rows) 921-938 ms,
# 2^28 966-998, 2^29 1018-1057, cuDNN 915-918 in the same processes; smaller chunks no better (2^25 930, 2^26 919:
# gluon_bwd_proc_var_3_h200_2026-12-04.json). At 32K one launch (no gain from chunks there, 46.1-47.4 vs
# 46.5-47.9 ms, gluon_bwd_sweep_dense32k_chunks_h200_2026-12-03.json). S2 has its own chunks (S2_BWD_CHUNK below).
# OVERRIDE["gluon_atomic_dq"] True/False forces the fused dq on/off. (Register atomics instead: 83 ms at 32K.)
GLUON_ATOMIC_DQ = True
FUSED_DQ_MAX_BYTES = 1 << 29  # one launch up to this much fp32 dq: 32K tokens x 32 heads x D 128
FUSED_DQ_CHUNK_BYTES = 1 << 27  # longer: chunks of this much fp32 dq (8K tokens x 32 heads x D 128)
FUSED_DQ_CHUNKS = True  # longer (dense): q chunks as above; False: the Triton dq kernel
# S2 from S2_BWD_CHUNK_FROM q rows on: the fused-dq dk/dv pass in q chunks of S2_BWD_CHUNK rows, one launch each,
# dk/dv summed in fp32, so that the CTAs running together read the same q/dout rows from L2 and add into the same dq
# rows (in one launch the on-shard KV tiles, which see every later q row, walk it at unrelated phases: L2 hit 32% vs
# dense 85%, bench/results/ncu_dkdv_s2_dense_32k_h200_2026-12-02.txt). H200 backward, S2 block 128 / window 2048 /
# sink 128 / stride 8: 32K 12.5-12.7 ms (one fused launch 13.3-14.1, Gluon dk/dv + Triton dq 13.0-13.4), 128K
# 120.5-120.6 (128.5-129.4, 139.5-140.7); chunks of 2K-16K within 2% at 128K; at 8K one launch is faster (1.71-1.77
# vs 1.90-1.99 in two chunks of 4K; bench/results/s2_bwd_chunk*_h200_2026-12-03.json). OVERRIDE["s2_chunk"] forces
# a chunk size (0: one launch) at any length.
S2_BWD_CHUNK = 6144
S2_BWD_CHUNK_FROM = 24576
# the sweep overrides tiles here: {(kernel, sparse): Tile}, {"fused": bool}
OVERRIDE: dict = {}
# fp32 operands (tf32 dots; the ring's checks) and GPUs without the shared memory for the tuned tiles
SMALL = Tile(64, 64, 4, 2)
# the interpreter: one small tile of 32 (or 16) tokens x packed heads
INTERP_TOKENS = 32


def _tile(kernel: str, sparse: bool, pack: int, sp_block: Optional[int], small: bool = False) -> Tile:
    """The tile for this kernel, shrunk until it tiles the sparse block and (dk/dv) the causal diagonal."""
    if INTERPRET:
        tokens = INTERP_TOKENS if sp_block is None or sp_block % INTERP_TOKENS == 0 else 16
        tokens = 16 if small else tokens
        return Tile(tokens * pack, tokens, 4, 1)
    t = SMALL if small else OVERRIDE.get((kernel, sparse), TILES[(kernel, sparse)])
    m, n = t.m, t.n
    while True:
        rows = m // pack
        bad_n = sp_block is not None and sp_block % n
        bad_rows = rows < 1 or m % pack or (sp_block is not None and sp_block % rows) or \
            (kernel.startswith("dkdv") and n % rows)
        if not bad_n and not bad_rows:
            return Tile(m, n, t.warps, t.stages)
        if bad_n and n > 16:
            n //= 2
        elif bad_rows and m > 16 and m // 2 >= pack:
            m //= 2
        else:
            raise ValueError(f"no kernel tile fits sparse block={sp_block} with {pack} packed heads; "
                             "use a block that is a multiple of 128")


def _fused(sparse: bool) -> bool:
    return OVERRIDE.get("fused", FUSED_BWD[sparse])


def _atomic_dq(sparse: bool) -> bool:
    return OVERRIDE.get("atomic_dq", ATOMIC_DQ[sparse])


# registers / spills of the last compiled launch per kernel name (read by the sweep)
STATS: dict = {}


def _run(kernel, grid, args, kw, tiles: dict, warps: int, stages: int):
    h = kernel[grid](*args, **kw, **tiles, num_warps=warps, num_stages=stages)
    if not INTERPRET and h is not None:
        STATS[kernel.fn.__name__] = (getattr(h, "n_regs", None), getattr(h, "n_spills", None))


def _launch(go, wide: bool):
    """``go(small)`` picks its tiles, grid and arguments and launches; fp32 operands start small, and a GPU
    without the shared memory for the tuned tiles gets one more try with small ones (grid recomputed)."""
    try:
        go(wide)
    except triton.runtime.errors.OutOfResources:
        if wide:
            raise
        go(True)


def _idx64(*pairs: tuple) -> bool:
    """True when (longest document) x (row stride) of some (len, tensor) pair may pass int32."""
    return max(n * x.stride(0) for n, x in pairs) >= 2 ** 31 - 2 ** 20


def _sparse_args(sparse: Optional[SparseArgs], device) -> tuple:
    if sparse is None:
        return torch.zeros(1, dtype=torch.int32, device=device), (128, 1, 0, 1)
    return sparse.dense_heads, (sparse.block, sparse.window_blocks, sparse.sink_blocks, sparse.stride)


def _use_tma(*xs: torch.Tensor) -> bool:
    """Backward loads by tensor descriptors (TMA on Hopper): on unless ``OVERRIDE['bwd_tma']`` is False, for
    16-bit operands on a GPU of compute capability 9.0+ (any dtype in the interpreter), when this Triton has
    descriptors and every tensor meets TMA's rules (16-byte aligned base and strides, last dim contiguous)."""
    if not OVERRIDE.get("bwd_tma", BWD_TMA) or _TensorDescriptor is None:
        return False
    x0 = xs[0]
    if not INTERPRET and (not x0.is_cuda or x0.element_size() != 2
                          or torch.cuda.get_device_capability(x0.device)[0] < 9):
        return False
    return all(x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all((st * x.element_size()) % 16 == 0
                                                                   for st in x.stride()[:-1]) for x in xs)


def _descs(on: bool, xs: tuple, box: list) -> tuple:
    """Tensor descriptors over [T, H, D] tensors with one box shape; the tensors themselves when ``on`` is False
    (the kernels then ignore those arguments)."""
    if not on:
        return xs
    return tuple(_TensorDescriptor(x, list(x.shape), list(x.stride()), box) for x in xs)


def _pack(pack: int) -> int:
    # rows = BLOCK_M // PACK must be a power of two: other group sizes run unpacked (K/V shared through L2)
    return pack if pack >= 1 and pack & (pack - 1) == 0 else 1


_GLUON: dict = {}


def _gluon(name: str = "gluon_sm90"):
    """A Gluon sm_90 module (``gluon_sm90``: the forward, ``gluon_sm90_bwd``: the dk/dv kernel), or None where this
    Triton has no Gluon (imported once)."""
    if name not in _GLUON:
        try:
            import importlib

            _GLUON[name] = importlib.import_module(f"{__package__}.{name}")
        except Exception:  # no triton.experimental.gluon (Triton < 3.5), or its Hopper API moved
            _GLUON[name] = None
    return _GLUON[name]


# ----------------------------------------------------------------------------------------------- drivers


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                      max_q: int, *, causal: bool, scale: float, out_dtype: torch.dtype,
                      sparse: Optional[SparseArgs] = None, pack: int = 1,
                      out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None,
                      accumulate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """q [Tq, Hq, D], k/v [Tk, Hkv, D], cu_q/cu_k int32 [n_docs+1] -> (out [Tq, Hq, D] out_dtype, lse fp32 [Hq, Tq]).

    ``accumulate``: ``out`` (fp32 [Tq, Hq, D], last dim contiguous) and ``lse`` (fp32 [Hq, Tq], token stride 1) hold a
    running result (zeros / -inf to start) that this call merges its block into, in place (the ring's hops)."""
    tq, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    pack = _pack(pack)
    wide = q.element_size() > 2  # fp32 operands: small tiles
    if INTERPRET:  # the interpreter's bf16 dot is wrong (triton-lang/triton#11584): same kernel on fp32 copies
        q, k, v = q.float(), k.float(), v.float()
    if accumulate:
        if out is None or lse is None or out.dtype != torch.float32 or lse.dtype != torch.float32 or \
                lse.stride(1) != 1 or out.stride(2) != 1:
            raise ValueError("accumulate=True needs fp32 out [Tq, Hq, D] and lse [Hq, Tq] (token stride 1)")
    if out is None:
        out = torch.empty((tq, hq, d), dtype=out_dtype, device=q.device)
    if lse is None:
        lse = torch.empty((hq, tq), dtype=torch.float32, device=q.device)
    dense, (spb, spw, sps, spst) = _sparse_args(sparse, q.device)
    if not INTERPRET and OVERRIDE.get("gluon_fwd", GLUON_FWD):
        g = _gluon()
        gpack = OVERRIDE.get("gluon_pack", pack)
        if g is not None and g.why_not(q, k, v, sparse, gpack) is None and g.attention_forward_into(
                q, k, v, out, lse, cu_q, cu_k, max_q, dense, (spb, spw, sps, spst), causal=causal, scale=scale,
                sparse=sparse is not None, pack=gpack, accumulate=accumulate):
            return out, lse
    n_docs = cu_q.numel() - 1
    is_sparse = sparse is not None
    n_hp = hq // pack
    kw = dict(GROUP=group, PACK=pack, CAUSAL=causal, SPARSE=is_sparse, HEAD_DIM=d,
              IDX64=_idx64((max_q, q), (max_q, out), (k.shape[0], k), (k.shape[0], v)))

    def go(small: bool):
        t = _tile("fwd", is_sparse, pack, spb if is_sparse else None, small)
        n_tiles = triton.cdiv(max(max_q, 1), t.m // pack)
        args = (q, k, v, out, lse, cu_q, cu_k, dense, scale * LOG2E,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                out.stride(0), out.stride(1), lse.stride(0), spb, spw, sps, spst, n_tiles, n_hp)
        _run(_attn_fwd, (n_tiles * n_hp, n_docs), args, kw, dict(BLOCK_M=t.m, BLOCK_N=t.n, ACC=accumulate), t.warps,
             t.stages)

    _launch(go, wide)
    return out, lse


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int, *,
                       causal: bool, scale: float, grad_dtype: Optional[torch.dtype] = None,
                       sparse: Optional[SparseArgs] = None, pack: int = 1,
                       acc: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of softmax attention given the (final) out and lse. Shapes as in ``attention_forward``;
    dq/dk/dv come back in ``grad_dtype`` (default: the input dtypes). ``acc=(dq, dk, dv)``: fp32 buffers (last dim
    contiguous) that the gradients are added into, in place, and returned (the ring's accumulators)."""
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    group = hq // hkv
    if sparse is None and pack == 1 and OVERRIDE.get("bwd_pack", BWD_PACK_DENSE):
        pack = group
    pack = _pack(pack)
    if acc is not None:
        dq, dk, dv = acc
        if any(x.dtype != torch.float32 or x.stride(-1) != 1 for x in acc):
            raise ValueError("acc: dq, dk, dv accumulators must be fp32 with a contiguous last dim")
    else:
        dq = torch.empty((tq, hq, d), dtype=grad_dtype or q.dtype, device=q.device)
        dk = torch.empty((tk, hkv, d), dtype=grad_dtype or k.dtype, device=q.device)
        dv = torch.empty((tk, hkv, d), dtype=grad_dtype or v.dtype, device=q.device)
    accumulate = acc is not None
    wide = q.element_size() > 2
    if INTERPRET:  # see attention_forward
        q, k, v = q.float(), k.float(), v.float()
    if do.stride(-1) != 1:
        do = do.contiguous()
    # the dots take dout in the operands' dtype (the ring may hand an fp32 one); delta uses it as given
    do_in, do = do, do.to(q.dtype)
    is_sparse = sparse is not None
    dense, (spb, spw, sps, spst) = _sparse_args(sparse, q.device)
    gb = None
    if not INTERPRET and OVERRIDE.get("gluon_bwd", GLUON_BWD) and not _fused(is_sparse) and \
            not _atomic_dq(is_sparse):
        gb = _gluon("gluon_sm90_bwd")
        if gb is not None and gb.why_not(q, k, v, do, lse, sparse) is not None:
            gb = None
    gluon_dkdv = False
    if gb is not None:  # delta (+ lse2) and dk/dv by the Gluon kernels, once, outside go() (accumulate mode)
        delta, lse2 = gb.prep(do_in, out, lse)
        g_dq = None
        # q rows per launch: all, or (fp32 dq past FUSED_DQ_MAX_BYTES) chunks of FUSED_DQ_CHUNK_BYTES of fp32 dq
        long = max_q > max(128, FUSED_DQ_MAX_BYTES // (hq * d * 4) // 128 * 128)
        chunk = max(128, min(FUSED_DQ_CHUNK_BYTES, FUSED_DQ_MAX_BYTES) // (hq * d * 4) // 128 * 128)
        s2_chunk = OVERRIDE.get("s2_chunk", S2_BWD_CHUNK if max_q >= S2_BWD_CHUNK_FROM else 0) if is_sparse else 0
        fused = OVERRIDE.get("gluon_atomic_dq", GLUON_ATOMIC_DQ and (not long or s2_chunk > 0 or
                                                                     (FUSED_DQ_CHUNKS and not is_sparse)))
        if s2_chunk:  # S2: short q chunks, their q/dout rows shared in L2 (see S2_BWD_CHUNK)
            rows = s2_chunk if max_q > s2_chunk else None
        else:
            rows = chunk if fused and long else None
        chunks = [(lo, lo + rows) for lo in range(0, max_q, rows)] if rows else [None]
        kdk, kdv, accumulate_k = dk, dv, acc is not None
        if len(chunks) > 1 and acc is None:  # dk/dv summed over the chunks in fp32
            kdk, kdv, accumulate_k = torch.zeros(dk.shape, dtype=torch.float32, device=q.device), \
                torch.zeros(dv.shape, dtype=torch.float32, device=q.device), True
        if fused:  # dq added in by the dk/dv kernel (TMA reduce-adds)
            g_dq = dq if gb.dq_buffer_ok(dq) else torch.zeros((tq, hq, d), dtype=torch.float32, device=q.device)
            if acc is None and g_dq is dq:
                g_dq.zero_()
        for i, q_range in enumerate(chunks):
            gluon_dkdv = gb.dkdv_into(do, q, k, v, delta, lse2, cu_q, cu_k, max_k, dense, (spb, spw, sps, spst), kdk,
                                      kdv, causal=causal, scale=scale, sparse=is_sparse, accumulate=accumulate_k,
                                      dq=g_dq, q_range=q_range)
            if not gluon_dkdv:  # a launch error (the first launch: nothing added; the Triton kernels below)
                if i:
                    raise RuntimeError("the Gluon dk/dv kernel failed to launch after its first chunk")
                break
        if gluon_dkdv and kdk is not dk:
            dk.copy_(kdk)
            dv.copy_(kdv)
        if gluon_dkdv and g_dq is not None:
            if g_dq is not dq:
                dq.add_(g_dq) if acc is not None else dq.copy_(g_dq)
            return dq, dk, dv
    else:
        # lse's strides (the kernels index delta with lse's head stride, also when lse is a view)
        delta = torch.empty_strided(lse.shape, lse.stride(), dtype=torch.float32, device=lse.device)
        blk = 64
        _bwd_delta[(triton.cdiv(tq, blk), hq)](out, do_in, delta, tq, out.stride(0), out.stride(1), do_in.stride(0),
                                               do_in.stride(1), delta.stride(0), HEAD_DIM=d, BLOCK=blk)
    n_docs = cu_q.numel() - 1
    sp_block = spb if is_sparse else None
    n_hp = hq // pack
    kw = dict(GROUP=group, PACK=pack, CAUSAL=causal, SPARSE=is_sparse, HEAD_DIM=d,
              IDX64=_idx64((max_q, q), (max_q, do), (max_q, dq), (max_k, k), (max_k, v), (max_k, dk),
                           (max_k, dv)))
    strides_in = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0),
                  do.stride(1))
    sp = (spb, spw, sps, spst)
    qk_scale = scale * LOG2E

    atomic = _atomic_dq(is_sparse)
    tma = _use_tma(q, k, v, do)
    dq_acc = None
    if atomic:  # dq summed over KV tiles in fp32 (the fp32 result doubles as the ring's fp32 dq)
        dq_acc = dq if dq.dtype == torch.float32 and (accumulate or dq.is_contiguous()) else torch.empty(
            (tq, hq, d), dtype=torch.float32, device=q.device)

    def go(small: bool):
        t1 = _tile("dkdv_atomic" if atomic else "dkdv", is_sparse, pack, sp_block, small)
        t2 = _tile("dq", is_sparse, pack, sp_block, small)
        n_kv_prog = triton.cdiv(max(max_k, 1), t1.n) * hkv
        n_qtiles = triton.cdiv(max(max_q, 1), t2.m // pack)
        if _fused(is_sparse) and not atomic:
            args = (q, k, v, do, lse, delta, dq, dk, dv, cu_q, cu_k, dense, qk_scale, scale, *strides_in,
                    dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
                    lse.stride(0), *sp, n_kv_prog, hkv, n_qtiles, n_hp)
            _run(_attn_bwd, (n_kv_prog + n_qtiles * n_hp, n_docs), args, kw,
                 dict(BLOCK_M1=t1.m, BLOCK_N1=t1.n, BLOCK_M2=t2.m, BLOCK_N2=t2.n, ACC=accumulate), t1.warps, t1.stages)
        elif atomic:
            if not accumulate:
                dq_acc.zero_()
            qd, dod = _descs(tma, (q, do), [t1.m // pack, pack, d])
            args = (q, k, v, do, lse, delta, dk, dv, cu_q, cu_k, dense, qk_scale, scale, *strides_in,
                    dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0), *sp, hkv,
                    dq_acc, dq_acc.stride(0), dq_acc.stride(1), qd, dod)
            _run(_attn_bwd_dkdv, (n_kv_prog, n_docs), args, kw,
                 dict(BLOCK_M=t1.m, BLOCK_N=t1.n, ATOMIC_DQ=True, ACC=accumulate, TMA=tma), t1.warps, t1.stages)
        else:
            if not gluon_dkdv:
                qd, dod = _descs(tma, (q, do), [t1.m // pack, pack, d])
                args = (q, k, v, do, lse, delta, dk, dv, cu_q, cu_k, dense, qk_scale, scale, *strides_in,
                        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0), *sp, hkv,
                        dq, dq.stride(0), dq.stride(1), qd, dod)
                _run(_attn_bwd_dkdv, (n_kv_prog, n_docs), args, kw,
                     dict(BLOCK_M=t1.m, BLOCK_N=t1.n, ATOMIC_DQ=False, ACC=accumulate, TMA=tma), t1.warps, t1.stages)
            kd, vd = _descs(tma, (k, v), [t2.n, 1, d])
            args = (q, k, v, do, lse, delta, dq, cu_q, cu_k, dense, qk_scale, scale, *strides_in,
                    dq.stride(0), dq.stride(1), lse.stride(0), *sp, n_qtiles, n_hp, kd, vd)
            _run(_attn_bwd_dq, (n_qtiles * n_hp, n_docs), args, kw,
                 dict(BLOCK_M=t2.m, BLOCK_N=t2.n, ACC=accumulate, TMA=tma), t2.warps, t2.stages)

    _launch(go, wide)
    if atomic and dq_acc is not dq:
        dq.copy_(dq_acc)
    return dq, dk, dv
