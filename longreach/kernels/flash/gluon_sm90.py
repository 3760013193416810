"""Hopper (sm_90) attention forward in Gluon: the fast path of ``triton.attention_forward`` on H100/H200.

Same contract as the Triton forward (``triton.py``): q [Tq, Hq, D], k/v [Tk, Hkv, D], packed documents, causal
top-left aligned per document pair, GQA without repeating K/V, the S2 block walk, lse fp32 [Hq, Tq], and the ring's
``accumulate`` mode (merge into a running fp32 out/lse in place). ``why_not`` says when it does not apply: everything else
(the interpreter, CPU, other GPUs, fp32 operands, other head dims, heads not adjacent in memory) runs the Triton
kernel, which stays the reference implementation that CI runs under ``TRITON_INTERPRET=1``.

Why a second forward: Triton 3.6 cannot warp-specialise this loop on Hopper, and it is what the forward needs
(bench/experiments/gluon_fwd/README.md). Per CTA a tile of 128 q rows, split between two consumer warpgroups (64
rows each, separate partitions with 240 registers each) and one TMA loader warp that streams K/V tiles into a ring
of ``STAGES`` shared-memory buffers; a buffer is freed when both consumers have arrived on its "empty" barrier.
Inside a consumer, Q sits in registers (``Q_RS``) and FlashAttention-3's intra-warpgroup order holds: S(t) = Q K_t^T
and O += P(t-1) V(t-1) are issued together and the softmax of S(t) runs while P V does; between the two consumers a
turn barrier orders the wgmma issues (FlashAttention-3's scheduler barrier), so one's softmax runs under the other's
matmuls.

Work items (q tile, head group, document) are sorted heaviest first; a CTA takes one, or (``PERSIST``, S2) one CTA
per SM walks a snake of them, its loader fetching the next tile's Q (once both consumers' last S = Q K^T is done:
``q_empty``) and K/V (the ring runs on across tiles) while the consumers finish this one.

Rows of a tile: ``PACK`` q heads of one GQA group x 128 / PACK tokens, head-major (row r = head r // (128 / PACK),
token r % (128 / PACK)); Q comes as PACK TMA boxes, one per head, so every K/V tile loaded serves all PACK heads
(S2 packs its group, as the Triton kernel does; dense runs PACK = 1 with a group's heads in adjacent CTAs, sharing
K/V through L2). H200, B1 Hq32 Hkv8 D128 causal bf16: dense 32K 15.0 ms (Triton 17.4), S2 32K 3.8 ms (Triton 4.4)
(bench/results/gluon_fwd_dev_h200_2026-12-02.json, gluon_fwd_pingpong_h200_2026-12-02.json).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .triton import LOG2E

# Triton 3.9 renamed the TMA load (3.6 has only the old name)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

BLOCK_M = 128  # q rows per CTA (64 per consumer warpgroup)
BLOCK_N = 128  # keys per K/V tile
STAGES = 3  # K/V ring depth (the overlapped order frees a buffer one tile late: 2 stages stall, see the README)
CONSUMER_REGS = 240
LOADER_REGS = 24
HEAD_DIMS = (64, 128)
# persistent (by sparse): one CTA per SM, each walking a snake of the work items (heaviest first), the next tile's Q
# and K/V loaded under this one's last steps and epilogue; else one CTA per item. H200 forward, 3 rounds alternated
# (bench/results/gluon_fwd_persist_h200_2026-12-02.json): S2 8K 0.541 vs 0.553-0.568 ms, 32K 3.70-3.77 vs 3.77-3.88,
# 128K 37.1-37.3 vs 37.7-37.8 (its tiles are short: ~30 steps at 32K); dense 8K/32K within 2%, 128K 235-243 vs 232-233
# (the CTAs of a GQA group drift apart over 248 rounds and stop sharing K/V in L2), so dense keeps one CTA per item
PERSIST = {False: False, True: True}
OVERRIDE_PERSIST: dict = {}  # experiments and checks: {sparse: bool}
# the consumers' turn barrier as hardware named barriers 12/13 (_turn_wait), else mbarriers (a one-thread mbarrier
# arrive needs a warpgroup-wide BAR.SYNC first: Nsight Compute put 17% of one consumer's samples there). H200, 3 rounds
# alternated, outputs identical (bench/results/gluon_fwd_knobs_namedturn_h200_2026-12-03.json): S2 128K 37.5-37.7 vs
# 37.9-38.2 ms, dense 128K 236.1-236.7 vs 236.4-237.6, 32K within noise; dense 128K fwd+bwd 934 / 952 vs 954 / 975
NAMED_TURN = 1
# Q as the register (A) operand of S = Q K^T, loaded from shared memory once per tile (its buffer then freed for the
# next tile's Q at once), instead of read from shared memory by every step's wgmma (FlashAttention-3 keeps it there).
# H200, 3 rounds alternated in one process, outputs identical, on two machines (bench/results/
# gluon_fwd_knobs_qrs012_h200_2026-12-04.json, gluon_fwd_knobs_qrs_h200_2026-12-04.json): S2 128K 37.0-37.2 vs
# 38.1-38.3 ms (36.8-36.9 vs 37.9-38.0), dense 128K 236.6-238.9 vs 238.9-240.2 (233.5-234.2 vs 236.5-237.3), 32K within
# 1% or better. Keeping the masked tiles' column indices from being hoisted out of the K/V loop as well made S2 128K
# 36.8 but dense 128K 246-248: not kept
Q_RS = 1
# the tile's one masked K/V tile (the causal diagonal, or a document's partial last keys: never more than one, as
# 128 / PACK tokens divide 128) walked first, as FlashAttention-4 does, so that the K/V loop after step 0 runs the
# unmasked softmax only (no mask code, and none of its indices live, in the loop; Triton 3.6's 12 B of spills in the
# dense variant go). H200, forward alone, 3 rounds alternated, check_sm90_forward ok, error against fp32 a little
# lower (bench/results/gluon_fwd_knobs_maskfirst_h200_2026-12-04.json): S2 32K 3.37-3.50 vs 3.50-3.53 ms, 128K
# 35.36-35.43 vs 36.32-36.43; dense 32K 13.86-14.46 vs 14.29-14.42, 128K 223.8-229.0 vs 231.3-235.4
MASK_FIRST = 1


@gluon.jit
def _order(t, n_iter, n_full, MASK_FIRST: gl.constexpr):
    # flat step t -> the tile walked there: (MASK_FIRST) the masked tiles [n_full, n_iter) first, then the others
    if MASK_FIRST:
        n_mask = n_iter - n_full
        return gl.where(t < n_mask, n_full + t, t - n_mask)
    else:
        return t


@gluon.jit
def _tile_start(t, lo, n_sink, n_shard, first, s, sp_block, n_full, safe_hi, SPARSE: gl.constexpr,
                BLOCK_N: gl.constexpr):
    # key column of flat step t: unmasked tiles (S2: sink, the head's shard, the window), then the diagonal ones
    if SPARSE:
        tpb = sp_block // BLOCK_N
        u = gl.maximum(t - n_sink, 0)
        shard = (first + (u // tpb) * s) * sp_block + (u % tpb) * BLOCK_N
        win = lo + (u - n_shard) * BLOCK_N
        body = gl.where(t < n_sink, t * BLOCK_N, gl.where(u < n_shard, shard, win))
    else:
        body = lo + t * BLOCK_N
    return gl.where(t < n_full, body, safe_hi + (t - n_full) * BLOCK_N)


@gluon.jit
def _tile(item, CU_Q, CU_K, DENSE, sp_block, sp_window, sp_sink, sp_stride, N_TILES, N_HP, N_DOCS,
          GROUP: gl.constexpr, PACK: gl.constexpr, CAUSAL: gl.constexpr, SPARSE: gl.constexpr, BLOCK_M: gl.constexpr,
          BLOCK_N: gl.constexpr):
    """Work item -> (hp, q_start, q_len, k_start, k_len, i0, hkv, n_iter, n_full, safe_hi, lo, n_sink, n_shard, first,
    s): items heaviest (last, for causal) tiles first, the head groups and documents of a tile side by side (a GQA
    group shares K/V in L2). n_iter = 0: nothing to do (past the document's end, or no key to see)."""
    TOK: gl.constexpr = BLOCK_M // PACK
    t = item // (N_HP * N_DOCS)
    rem = item - t * (N_HP * N_DOCS)
    hp = rem % N_HP
    doc = rem // N_HP
    pid_m = N_TILES - 1 - t
    q_start = gl.load(CU_Q + doc)
    q_len = gl.load(CU_Q + doc + 1) - q_start
    k_start = gl.load(CU_K + doc)
    k_len = gl.load(CU_K + doc + 1) - k_start
    i0 = pid_m * TOK
    hkv = (hp * PACK) // GROUP
    if CAUSAL:
        hi = gl.minimum(k_len, i0 + TOK)
        safe_hi = (gl.minimum(k_len, i0) // BLOCK_N) * BLOCK_N
    else:
        hi = k_len
        safe_hi = (k_len // BLOCK_N) * BLOCK_N
    if SPARSE:  # S2 walk of the off-diagonal tiles (as the Triton kernel's _sparse_walk)
        qb = i0 // sp_block
        lo_wb = gl.maximum(qb - sp_window + 1, 0)
        tpb = sp_block // BLOCK_N
        dense = gl.load(DENSE + hkv)
        s = gl.where(dense != 0, 1, sp_stride)
        first = sp_sink + (hkv % s - sp_sink % s + s) % s
        n_shard = gl.where(lo_wb > first, (lo_wb - first + s - 1) // s, 0) * tpb
        n_sink = gl.minimum(sp_sink, lo_wb) * tpb
        lo = lo_wb * sp_block
        n_full = n_sink + n_shard + gl.maximum(safe_hi - lo, 0) // BLOCK_N
    else:
        n_sink = i0 * 0
        n_shard = i0 * 0
        first = i0 * 0
        s = i0 * 0 + 1
        lo = i0 * 0
        n_full = safe_hi // BLOCK_N
    n_iter = n_full + gl.cdiv(gl.maximum(hi - safe_hi, 0), BLOCK_N)
    n_iter = gl.where(i0 < q_len, n_iter, 0)
    return hp, q_start, q_len, k_start, k_len, i0, hkv, n_iter, n_full, safe_hi, lo, n_sink, n_shard, first, s


@gluon.jit
def _item(r, pid, n_prog):
    # round r of this CTA's items: a snake over the CTAs (forward on even rounds, backward on odd ones), so that
    # with items sorted heaviest first each CTA's total comes out about even
    return r * n_prog + gl.where(r % 2 == 0, pid, n_prog - 1 - pid)


@gluon.jit
def _loader(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, q_empty, kv_ready, kv_empty,
            CU_Q, CU_K, DENSE, sp_block, sp_window, sp_sink, sp_stride, N_TILES, N_HP, N_DOCS, n_items, pid, n_prog,
            GROUP: gl.constexpr, PACK: gl.constexpr, CAUSAL: gl.constexpr, SPARSE: gl.constexpr,
            BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, HEAD_DIM: gl.constexpr,
            MASK_FIRST: gl.constexpr):
    TOK: gl.constexpr = q_desc.block_type.shape[0]  # tokens per tile; one box per packed head
    kc = 0  # K/V tiles loaded so far (ring position), Q tiles so far
    nt = 0
    for r in range(gl.cdiv(n_items, n_prog)):  # (the snake: every CTA takes every round)
        item = _item(r, pid, n_prog)
        if item < n_items:
            hp, q_start, q_len, k_start, k_len, i0, hkv, n_iter, n_full, safe_hi, lo, n_sink, n_shard, first, s = \
                _tile(item, CU_Q, CU_K, DENSE, sp_block, sp_window, sp_sink, sp_stride, N_TILES, N_HP, N_DOCS,
                      GROUP, PACK, CAUSAL, SPARSE, BLOCK_M, BLOCK_N)
            if n_iter > 0:
                # the previous tile's Q is free once both consumers' last S = Q K^T is done
                mbarrier.wait(q_empty, (nt & 1) ^ 1)
                mbarrier.expect(q_bar, PACK * q_desc.block_type.nbytes)
                for j in gl.static_range(PACK):
                    _tma_load(q_desc, [q_start + i0, hp * PACK * HEAD_DIM + j * HEAD_DIM], q_bar,
                              q_smem.slice(j * TOK, TOK, dim=0))
                for t in range(n_iter):
                    g = kc + t
                    st = g % STAGES
                    mbarrier.wait(kv_empty.index(st), ((g // STAGES) & 1) ^ 1)
                    start = _tile_start(_order(t, n_iter, n_full, MASK_FIRST), lo, n_sink, n_shard, first, s, sp_block,
                                        n_full, safe_hi, SPARSE, BLOCK_N)
                    bar = kv_ready.index(st)
                    mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
                    _tma_load(k_desc, [k_start + start, hkv * HEAD_DIM], bar, k_bufs.index(st))
                    _tma_load(v_desc, [k_start + start, hkv * HEAD_DIM], bar, v_bufs.index(st))
                kc += n_iter
                nt += 1


@gluon.jit
def _softmax(qk, m_i, l_i, masked, start, tok, offs_n, k_len, qk_scale, CAUSAL: gl.constexpr):
    """Online-softmax step of one S tile -> (p, new row max, row rescale alpha, new row sum). ``masked``: a diagonal
    or document-end tile (causal / key mask; a row that sees nothing yet keeps m = -inf)."""
    if masked:
        cols = start + offs_n
        ok = gl.expand_dims(cols < k_len, 0)
        if CAUSAL:
            ok = ok & (gl.expand_dims(cols, 0) <= gl.expand_dims(tok, 1))
        qk = gl.where(ok, qk * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(qk, 1))
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(qk - gl.expand_dims(m_use, 1))
    else:
        m_new = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)
        m_use = m_new
        p = gl.exp2(qk * qk_scale - gl.expand_dims(m_use, 1))
    alpha = gl.exp2(m_i - m_use)
    return p, m_new, alpha, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def _bar(asm: gl.constexpr):
    # one PTX barrier instruction executed by every thread of this warpgroup (a [128] tensor, one element each)
    gl.inline_asm_elementwise(asm, "=r,r", [gl.arange(0, 128, layout=gl.BlockedLayout([1], [32], [4], [0]))],
                              dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _turn_wait(turn, w: gl.constexpr, t, NAMED: gl.constexpr):
    """Wait until this consumer may issue its turn t's wgmmas. NAMED: FlashAttention-3's scheduler barrier, hardware
    named barriers 12 / 13 of 256 threads (this warpgroup's bar.sync + the other's bar.arrive): every thread arrives
    itself, so no warpgroup-wide sync precedes the arrive as it does before a one-thread mbarrier arrive."""
    if NAMED:
        if w == 0:
            _bar("bar.sync 12, 256; mov.u32 $0, 0;")
        else:
            _bar("bar.sync 13, 256; mov.u32 $0, 0;")
    else:
        _my_turn(turn, w, t)


@gluon.jit
def _turn_done(turn, w: gl.constexpr, NAMED: gl.constexpr):
    # this consumer has issued its turn's wgmmas: the other's turn
    if NAMED:
        if w == 0:
            _bar("bar.arrive 13, 256; mov.u32 $0, 0;")
        else:
            _bar("bar.arrive 12, 256; mov.u32 $0, 0;")
    else:
        mbarrier.arrive(turn.index(1 - w))


@gluon.jit
def _my_turn(turn, w: gl.constexpr, t):
    # consumer 0 issues step t's wgmmas after consumer 1 has issued step t-1's; consumer 1 after consumer 0 step t's
    if w == 0:
        mbarrier.wait(turn.index(0), (t - 1) & 1, pred=t > 0)
    else:
        mbarrier.wait(turn.index(1), t & 1)


@gluon.jit
def _consumer(w: gl.constexpr, q_smem, k_bufs, v_bufs, q_bar, q_empty, kv_ready, kv_empty, turn, O, LSE, stride_ot,
              stride_oh, stride_lh, CU_Q, CU_K, DENSE, sp_block, sp_window, sp_sink, sp_stride, N_TILES, N_HP, N_DOCS,
              n_items, pid, n_prog, qk_scale,
              GROUP: gl.constexpr, PACK: gl.constexpr, CAUSAL: gl.constexpr, SPARSE: gl.constexpr,
              HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              ACC: gl.constexpr, NAMED: gl.constexpr, QRS: gl.constexpr, MASK_FIRST: gl.constexpr):
    if NAMED and w == 1:  # consumer 0's first turn (its bar.sync count needs 256: this warpgroup's 128 arrive now)
        _bar("bar.arrive 12, 256; mov.u32 $0, 0;")
    kc = 0  # K/V ring position and Q tiles seen, as the loader and the other consumer count them; turns taken: kc + nt
    nt = 0
    for r in range(gl.cdiv(n_items, n_prog)):  # (the snake: every CTA takes every round)
        item = _item(r, pid, n_prog)
        if item < n_items:
            hp, q_start, q_len, k_start, k_len, i0, hkv, n_iter, n_full, safe_hi, lo, n_sink, n_shard, first, s = \
                _tile(item, CU_Q, CU_K, DENSE, sp_block, sp_window, sp_sink, sp_stride, N_TILES, N_HP, N_DOCS,
                      GROUP, PACK, CAUSAL, SPARSE, BLOCK_M, BLOCK_N)
            if n_iter > 0:
                _tile_body(w, q_smem, k_bufs, v_bufs, q_bar, q_empty, kv_ready, kv_empty, turn, O, LSE, stride_ot,
                           stride_oh, stride_lh, hp, q_start, q_len, k_len, i0, n_iter, n_full, safe_hi, lo, n_sink,
                           n_shard, first, s, sp_block, qk_scale, kc, kc + nt, nt, CAUSAL, SPARSE, HEAD_DIM,
                           BLOCK_N, STAGES, PACK, ACC, NAMED, QRS, MASK_FIRST)
                kc += n_iter
                nt += 1
            else:
                if not ACC:  # a q tile with no key to see (an empty kv document): out 0, lse -inf
                    _empty_tile(w, O, LSE, stride_ot, stride_oh, stride_lh, hp, q_start, q_len, i0, HEAD_DIM, PACK)
    if NAMED and w == 0:  # consumer 1's last arrive on 12 (one more than consumer 0's turns): leave no barrier half-met
        _bar("bar.sync 12, 256; mov.u32 $0, 0;")


@gluon.jit
def _empty_tile(w: gl.constexpr, O, LSE, stride_ot, stride_oh, stride_lh, hp, q_start, q_len, i0,
                HEAD_DIM: gl.constexpr, PACK: gl.constexpr):
    ROWS: gl.constexpr = 64
    TOK: gl.constexpr = 128 // PACK
    b_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    r = w * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, b_l))
    tok = i0 + r % TOK
    head = hp * PACK + r // TOK
    od = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, b_l))
    ok = tok < q_len
    o_ptrs = O + gl.expand_dims((q_start + tok).to(gl.int64) * stride_ot + head * stride_oh, 1) + gl.expand_dims(od, 0)
    gl.store(o_ptrs, gl.zeros([ROWS, HEAD_DIM], gl.float32, b_l).to(O.dtype.element_ty), mask=gl.expand_dims(ok, 1))
    gl.store(LSE + head * stride_lh + q_start + tok, gl.full([ROWS], float("-inf"), gl.float32,
                                                              gl.SliceLayout(1, b_l)), mask=ok)


@gluon.jit
def _tile_body(w: gl.constexpr, q_smem, k_bufs, v_bufs, q_bar, q_empty, kv_ready, kv_empty, turn, O, LSE, stride_ot,
               stride_oh, stride_lh, hp, q_start, q_len, k_len, i0, n_iter, n_full, safe_hi, lo, n_sink, n_shard,
               first, s, sp_block, qk_scale, kc, tc, nt,
               CAUSAL: gl.constexpr, SPARSE: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
               STAGES: gl.constexpr, PACK: gl.constexpr, ACC: gl.constexpr, NAMED: gl.constexpr,
               QRS: gl.constexpr, MASK_FIRST: gl.constexpr):
    # one tile (n_iter >= 1): kc = K/V ring position of its first tile, tc = turns before it, nt = Q tiles before it
    ROWS: gl.constexpr = 64
    TOK: gl.constexpr = 128 // PACK
    # MASK_FIRST's premise: a tile's tokens (TOK, at a multiple of TOK) never straddle two K/V tiles' worth of mask
    gl.static_assert(BLOCK_N % TOK == 0, "MASK_FIRST needs the tile's tokens to divide BLOCK_N")
    s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
    p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)
    row_l: gl.constexpr = gl.SliceLayout(1, s_l)
    col_l: gl.constexpr = gl.SliceLayout(0, s_l)
    orow_l: gl.constexpr = gl.SliceLayout(1, o_l)
    dtype: gl.constexpr = q_smem.dtype
    q_w = q_smem.slice(w * ROWS, ROWS, dim=0)
    tok = i0 + (w * ROWS + gl.arange(0, ROWS, layout=row_l)) % TOK
    offs_n = gl.arange(0, BLOCK_N, layout=col_l)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, row_l)
    l_i = gl.zeros([ROWS], gl.float32, row_l)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_l)
    mbarrier.wait(q_bar, nt & 1)
    if QRS:
        q_op = q_w.load(gl.DotOperandLayout(operand_index=0, parent=s_l, k_width=2))
        mbarrier.arrive(q_empty)  # Q is in registers: the loader may bring the next tile's
    else:
        q_op = q_w
    # step 0's S alone; then each step issues S(u) and O += P(u-1) V(u-1) together, runs the softmax of S(u) while
    # P V runs, and rescales O only after both are done (nothing writes an accumulator while a wgmma is in flight)
    mbarrier.wait(kv_ready.index(kc % STAGES), (kc // STAGES) & 1)
    _turn_wait(turn, w, tc, NAMED)
    qk_tok = warpgroup_mma(q_op, k_bufs.index(kc % STAGES).permute((1, 0)),
                           gl.zeros([ROWS, BLOCK_N], gl.float32, s_l), use_acc=False, is_async=True)
    _turn_done(turn, w, NAMED)
    qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk_tok, ))
    t0 = _order(0, n_iter, n_full, MASK_FIRST)
    start = _tile_start(t0, lo, n_sink, n_shard, first, s, sp_block, n_full, safe_hi, SPARSE, BLOCK_N)
    p, m_i, alpha, l_i = _softmax(qk, m_i, l_i, t0 >= n_full, start, tok, offs_n, k_len, qk_scale, CAUSAL)
    p16 = gl.convert_layout(p.to(dtype), p_l)
    for u in range(1, n_iter):
        g = kc + u
        su = g % STAGES
        sp_ = (g - 1) % STAGES
        if MASK_FIRST:  # (at most one masked tile, walked at step 0)
            start = 0
        else:
            start = _tile_start(u, lo, n_sink, n_shard, first, s, sp_block, n_full, safe_hi, SPARSE, BLOCK_N)
        mbarrier.wait(kv_ready.index(su), (g // STAGES) & 1)
        _turn_wait(turn, w, tc + u, NAMED)
        qk_tok = warpgroup_mma(q_op, k_bufs.index(su).permute((1, 0)), gl.zeros([ROWS, BLOCK_N], gl.float32, s_l),
                               use_acc=False, is_async=True)
        acc_tok = warpgroup_mma(p16, v_bufs.index(sp_), acc, is_async=True)
        _turn_done(turn, w, NAMED)
        qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk_tok, ))
        if MASK_FIRST:
            p, m_new, alpha, l_i = _softmax(qk, m_i, l_i, False, start, tok, offs_n, k_len, qk_scale, CAUSAL)
        else:
            p, m_new, alpha, l_i = _softmax(qk, m_i, l_i, u >= n_full, start, tok, offs_n, k_len, qk_scale, CAUSAL)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc_tok, ))
        mbarrier.arrive(kv_empty.index(sp_))  # tile u-1's K and V have been read
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow_l), 1)
        p16 = gl.convert_layout(p.to(dtype), p_l)
        m_i = m_new
    if not QRS:
        mbarrier.arrive(q_empty)  # every S = Q K^T of this tile is done: the loader may bring the next tile's Q
    last = (kc + n_iter - 1) % STAGES
    _turn_wait(turn, w, tc + n_iter, NAMED)
    acc = warpgroup_mma(p16, v_bufs.index(last), acc)
    _turn_done(turn, w, NAMED)
    mbarrier.arrive(kv_empty.index(last))
    empty = l_i == 0.0
    l_safe = gl.where(empty, 1.0, l_i)
    lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe)) / 1.4426950408889634)
    out = acc / gl.expand_dims(gl.convert_layout(l_safe, orow_l), 1)
    r_o = w * ROWS + gl.arange(0, ROWS, layout=orow_l)
    otok = i0 + r_o % TOK
    ohead = hp * PACK + r_o // TOK
    od = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_l))
    o_ok = gl.expand_dims(otok < q_len, 1)
    o_ptrs = O + gl.expand_dims((q_start + otok).to(gl.int64) * stride_ot + ohead * stride_oh, 1) + \
        gl.expand_dims(od, 0)
    r_l = w * ROWS + gl.arange(0, ROWS, layout=row_l)
    l_ok = tok < q_len
    l_ptrs = LSE + (hp * PACK + r_l // TOK) * stride_lh + q_start + tok
    if ACC:  # out = w_prev out_prev + w_blk out_blk with weights exp(lse_x - logaddexp(lse_prev, lse_blk))
        lse_prev = gl.load(l_ptrs, mask=l_ok, other=float("-inf"))
        mx = gl.maximum(lse_prev, lse)
        mx_safe = gl.where(mx == float("-inf"), 0.0, mx)
        w_prev = gl.exp(lse_prev - mx_safe)
        w_blk = gl.exp(lse - mx_safe)
        tot = w_prev + w_blk
        tot_safe = gl.where(tot == 0.0, 1.0, tot)
        o_prev = gl.load(o_ptrs, mask=o_ok, other=0.0)
        out = o_prev * gl.expand_dims(gl.convert_layout(w_prev / tot_safe, orow_l), 1) + \
            out * gl.expand_dims(gl.convert_layout(w_blk / tot_safe, orow_l), 1)
        lse = gl.where(tot == 0.0, float("-inf"), mx_safe + gl.log(tot_safe))
    gl.store(o_ptrs, out.to(O.dtype.element_ty), mask=o_ok)
    gl.store(l_ptrs, lse, mask=l_ok)


@gluon.jit
def _attn_fwd_sm90(q_desc, k_desc, v_desc, O, LSE, CU_Q, CU_K, DENSE, qk_scale, stride_ot, stride_oh, stride_lh,
                   sp_block, sp_window, sp_sink, sp_stride, N_TILES, N_HP, N_DOCS,
                   GROUP: gl.constexpr, PACK: gl.constexpr, CAUSAL: gl.constexpr, SPARSE: gl.constexpr,
                   HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                   CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr, ACC: gl.constexpr, NAMED: gl.constexpr,
                   QRS: gl.constexpr, MASK_FIRST: gl.constexpr):
    # work items (q tile, head group, document) heaviest first; one per CTA, or (persistent: a grid of fewer CTAs
    # than items) a snake of them per CTA, the next tile's Q and K/V loaded under this one's last steps and epilogue
    pid = gl.program_id(0)
    n_prog = gl.num_programs(0)
    n_items = N_TILES * N_HP * N_DOCS
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], k_desc.layout)
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    mbarrier.init(q_empty, count=2)  # both consumer warpgroups
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(kv_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)  # both consumer warpgroups
    gl.warp_specialize([
        # (the argument tuples are written out: a tuple held in a variable turns its constexprs into tensors)
        (_consumer, (0, q_smem, k_bufs, v_bufs, q_bar, q_empty, kv_ready, kv_empty, turn, O, LSE, stride_ot,
                     stride_oh, stride_lh, CU_Q, CU_K, DENSE, sp_block, sp_window, sp_sink, sp_stride, N_TILES, N_HP,
                     N_DOCS, n_items, pid, n_prog, qk_scale, GROUP, PACK, CAUSAL, SPARSE, HEAD_DIM, BLOCK_M, BLOCK_N,
                     STAGES, ACC, NAMED, QRS, MASK_FIRST)),
        (_consumer, (1, q_smem, k_bufs, v_bufs, q_bar, q_empty, kv_ready, kv_empty, turn, O, LSE, stride_ot,
                     stride_oh, stride_lh, CU_Q, CU_K, DENSE, sp_block, sp_window, sp_sink, sp_stride, N_TILES, N_HP,
                     N_DOCS, n_items, pid, n_prog, qk_scale, GROUP, PACK, CAUSAL, SPARSE, HEAD_DIM, BLOCK_M, BLOCK_N,
                     STAGES, ACC, NAMED, QRS, MASK_FIRST)),
        (_loader, (q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, q_empty, kv_ready, kv_empty, CU_Q, CU_K,
                   DENSE, sp_block, sp_window, sp_sink, sp_stride, N_TILES, N_HP, N_DOCS, n_items, pid, n_prog,
                   GROUP, PACK, CAUSAL, SPARSE, BLOCK_M, BLOCK_N, STAGES, HEAD_DIM, MASK_FIRST)),
    ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


# ----------------------------------------------------------------------------------------------- host side


def _flat(x: torch.Tensor) -> Optional[torch.Tensor]:
    """[T, H, D] with heads adjacent -> the [T, H*D] view the TMA descriptors walk (None when heads are not)."""
    t, h, d = x.shape
    if x.stride(2) != 1 or (h > 1 and x.stride(1) != d):
        return None
    return x.as_strided((t, h * d), (x.stride(0), 1))


_BROKEN: list = []  # the first launch error, after which this path is off for the process


def operands_why_not(broken: list, xs: tuple, names: str, sparse, block_n: int) -> Optional[str]:
    """The checks the Gluon sm_90 kernels share, on ``xs`` = (q, k, ...) all loaded by TMA: None when they pass,
    else the reason. ``broken``: the module's launch errors (non-empty: the path is off)."""
    q, k = xs[0], xs[1]
    if broken:
        return f"disabled after a launch error: {broken[0]}"
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
        return "needs a CUDA device of compute capability 9.x (Hopper)"
    if q.dtype not in (torch.bfloat16, torch.float16) or any(x.dtype != q.dtype for x in xs):
        return f"needs bf16 or fp16 {names} of one dtype"
    if q.shape[0] == 0 or k.shape[0] == 0:
        return "no tokens (a TMA descriptor needs a non-empty tensor)"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head dim {q.shape[-1]} not in {HEAD_DIMS}"
    if sparse is not None and sparse.block % block_n:
        return f"S2 block {sparse.block} is not a multiple of {block_n}"
    for x in xs:
        if _flat(x) is None or x.data_ptr() % 16 or (x.stride(0) * x.element_size()) % 16:
            return "TMA needs heads adjacent, a contiguous head dim and 16-byte aligned rows"
    if q.shape[1] * q.shape[0] >= 2 ** 31:
        return "lse index passes int32"
    return None


def launch_guarded(broken: list, what: str, launch) -> bool:
    """``launch()``; False (and ``broken`` records why, with one warning) when it raised: a Triton whose Gluon API
    moved. The caller then runs the Triton kernel, and ``why_not`` keeps this path off from then on."""
    try:
        launch()
    except Exception as e:
        broken.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        warnings.warn(f"longreach: the Gluon sm_90 {what} failed to launch ({broken[0]}); using the Triton kernel",
                      RuntimeWarning, stacklevel=4)
        return False
    return True


def why_not(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sparse, pack: int) -> Optional[str]:
    """None when this forward applies to these tensors, else the reason (the Triton kernel then runs)."""
    why = operands_why_not(_BROKEN, (q, k, v), "q, k, v", sparse, BLOCK_N)
    if why is None and (BLOCK_M % pack or (BLOCK_M // pack) % 8):
        return f"pack {pack} does not split {BLOCK_M} rows into TMA boxes"
    return why


def attention_forward_into(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                           cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, dense: torch.Tensor, sp: tuple, *,
                           causal: bool, scale: float, sparse: bool, pack: int, accumulate: bool) -> bool:
    """The forward of ``triton.attention_forward`` into its ``out``/``lse`` (inputs checked and ``dense``/``sp``
    = (block, window, sink, stride) built by it). False when the launch failed: the caller then runs the Triton
    kernel, and this path stays off with a warning."""
    tq, hq, d = q.shape
    hkv = k.shape[1]
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    tok = BLOCK_M // pack
    lay = gl.NVMMASharedLayout.get_default_for([BLOCK_N, d], gdt)
    q_desc = TensorDescriptor.from_tensor(_flat(q), [tok, d], lay)
    k_desc = TensorDescriptor.from_tensor(_flat(k), [BLOCK_N, d], lay)
    v_desc = TensorDescriptor.from_tensor(_flat(v), [BLOCK_N, d], lay)
    n_tiles = triton.cdiv(max(max_q, 1), tok)
    n_hp = hq // pack
    n_docs = cu_q.numel() - 1
    n_items = n_tiles * n_hp * n_docs
    persist = OVERRIDE_PERSIST.get(sparse, PERSIST[sparse])
    grid = (min(n_items, _sm_count(q.device)) if persist else n_items, )
    return launch_guarded(_BROKEN, "attention forward", lambda: _attn_fwd_sm90[grid](
        q_desc, k_desc, v_desc, out, lse, cu_q, cu_k, dense, scale * LOG2E, out.stride(0), out.stride(1),
        lse.stride(0), *sp, n_tiles, n_hp, n_docs, GROUP=hq // hkv, PACK=pack, CAUSAL=causal, SPARSE=sparse,
        HEAD_DIM=d, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, STAGES=STAGES, CONSUMER_REGS=CONSUMER_REGS,
        LOADER_REGS=LOADER_REGS, ACC=accumulate, NAMED=NAMED_TURN, QRS=Q_RS, MASK_FIRST=MASK_FIRST,
        num_warps=4))


_SMS: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":  # scripts/kernel_stats.py compiles for sm_90 on CPU tensors (the grid is not compiled)
        return 132
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]
