"""Hopper (sm_90) attention forward in Gluon, warp-specialised (FlashAttention-3's layout without its named-barrier
ping-pong): per CTA a tile of 128 q tokens of one q head, split between TWO independent consumer warpgroups (64 rows
each, separate partitions, so neither waits for the other: one's softmax runs under the other's wgmmas), and one
loader warp that streams K/V tiles by TMA into a ring of STAGES buffers. A buffer is freed when both consumers have
arrived on its "empty" barrier (count 2).

Same contract as ``longreach.kernels.flash.triton.attention_forward`` for dense causal / non-causal, packed
documents, GQA (K/V shared through L2, heads of a group adjacent in the grid) and the S2 block walk; no ring
accumulate mode. Needs Gluon (Triton >= 3.5), compute capability 9.x, 16-bit operands, heads adjacent in memory.
Status: correct and 1.15x faster than the Triton forward on the H200 (README.md); the package kernel is
longreach/kernels/flash/gluon_sm90.py.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

LOG2E = 1.4426950408889634
BLOCK_M = 128  # q tokens per CTA (64 per consumer warpgroup)
BLOCK_N = 128  # keys per K/V tile
STAGES = 2
CONSUMER_REGS = 240
LOADER_REGS = 24
OVERLAP = 0  # 1: intra-warpgroup overlap in FlashAttention-3's order (README)
PINGPONG = 0  # 1: the two consumers take turns issuing their wgmmas (FlashAttention-3's scheduler barrier)


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
def _loader(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, kv_ready, kv_empty, q_row, q_col, k_row0, kv_col,
            n_iter, n_full, safe_hi, lo, n_sink, n_shard, first, s, sp_block,
            SPARSE: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, q_col], q_bar, q_smem)
    for t in range(n_iter):
        st = t % STAGES
        mbarrier.wait(kv_empty.index(st), ((t // STAGES) & 1) ^ 1)
        start = _tile_start(t, lo, n_sink, n_shard, first, s, sp_block, n_full, safe_hi, SPARSE, BLOCK_N)
        bar = kv_ready.index(st)
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [k_row0 + start, kv_col], bar, k_bufs.index(st))
        tma.async_copy_global_to_shared(v_desc, [k_row0 + start, kv_col], bar, v_bufs.index(st))


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
def _my_turn(turn, w: gl.constexpr, t, PINGPONG: gl.constexpr):
    # consumer 0 issues step t's wgmmas after consumer 1 issued step t-1's; consumer 1 after consumer 0 issued step t
    if PINGPONG:
        if w == 0:
            mbarrier.wait(turn.index(0), (t - 1) & 1, pred=t > 0)
        else:
            mbarrier.wait(turn.index(1), t & 1)


@gluon.jit
def _pass_turn(turn, w: gl.constexpr, PINGPONG: gl.constexpr):
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - w))


@gluon.jit
def _consumer(w: gl.constexpr, q_smem, k_bufs, v_bufs, q_bar, kv_ready, kv_empty, turn, O, LSE, stride_ot, stride_oh,
              stride_lh, head, q_start, q_len, k_len, i0, n_iter, n_full, safe_hi, lo, n_sink, n_shard, first, s,
              sp_block, qk_scale,
              CAUSAL: gl.constexpr, SPARSE: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
              STAGES: gl.constexpr, OVERLAP: gl.constexpr, PINGPONG: gl.constexpr):
    ROWS: gl.constexpr = 64
    s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
    p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)
    row_l: gl.constexpr = gl.SliceLayout(1, s_l)
    col_l: gl.constexpr = gl.SliceLayout(0, s_l)
    dtype: gl.constexpr = q_smem.dtype
    q_w = q_smem.slice(w * ROWS, ROWS, dim=0)
    tok = i0 + w * ROWS + gl.arange(0, ROWS, layout=row_l)
    offs_n = gl.arange(0, BLOCK_N, layout=col_l)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, row_l)
    l_i = gl.zeros([ROWS], gl.float32, row_l)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_l)
    mbarrier.wait(q_bar, 0)
    if OVERLAP:
        # FlashAttention-3's intra-warpgroup order: issue S(u) = Q K_u^T, issue O += P(u-1) V_(u-1), softmax of
        # S(u) while P V runs, then rescale O; nothing writes an accumulator while a wgmma is in flight
        mbarrier.wait(kv_ready.index(0), 0, pred=n_iter > 0)
        _my_turn(turn, w, 0, PINGPONG)
        qk_tok = warpgroup_mma(q_w, k_bufs.index(0).permute((1, 0)), gl.zeros([ROWS, BLOCK_N], gl.float32, s_l),
                               use_acc=False, is_async=True)
        _pass_turn(turn, w, PINGPONG)
        qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk_tok, ))
        start = _tile_start(0, lo, n_sink, n_shard, first, s, sp_block, n_full, safe_hi, SPARSE, BLOCK_N)
        p, m_new, alpha, l_i = _softmax(qk, m_i, l_i, 0 >= n_full, start, tok, offs_n, k_len, qk_scale, CAUSAL)
        l_i = gl.where(n_iter > 0, l_i, 0.0)  # (no tile at all: out 0, lse -inf)
        m_i = gl.where(n_iter > 0, m_new, float("-inf"))
        p16 = gl.convert_layout(p.to(dtype), p_l)
        for u in range(1, n_iter):
            su = u % STAGES
            sp_ = (u - 1) % STAGES
            start = _tile_start(u, lo, n_sink, n_shard, first, s, sp_block, n_full, safe_hi, SPARSE, BLOCK_N)
            mbarrier.wait(kv_ready.index(su), (u // STAGES) & 1)
            _my_turn(turn, w, u, PINGPONG)
            qk_tok = warpgroup_mma(q_w, k_bufs.index(su).permute((1, 0)),
                                   gl.zeros([ROWS, BLOCK_N], gl.float32, s_l), use_acc=False, is_async=True)
            acc_tok = warpgroup_mma(p16, v_bufs.index(sp_), acc, is_async=True)
            _pass_turn(turn, w, PINGPONG)
            qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk_tok, ))
            p, m_new, alpha, l_i = _softmax(qk, m_i, l_i, u >= n_full, start, tok, offs_n, k_len, qk_scale, CAUSAL)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc_tok, ))
            mbarrier.arrive(kv_empty.index(sp_))  # tile u-1's K and V have been read
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_l)), 1)
            p16 = gl.convert_layout(p.to(dtype), p_l)
            m_i = m_new
        if n_iter > 0:
            _my_turn(turn, w, n_iter, PINGPONG)
            acc = warpgroup_mma(p16, v_bufs.index((n_iter - 1) % STAGES), acc)
            _pass_turn(turn, w, PINGPONG)
            mbarrier.arrive(kv_empty.index((n_iter - 1) % STAGES))
    else:
        for t in range(n_iter):
            st = t % STAGES
            mbarrier.wait(kv_ready.index(st), (t // STAGES) & 1)
            start = _tile_start(t, lo, n_sink, n_shard, first, s, sp_block, n_full, safe_hi, SPARSE, BLOCK_N)
            _my_turn(turn, w, t, PINGPONG)
            qk_tok = warpgroup_mma(q_w, k_bufs.index(st).permute((1, 0)),
                                   gl.zeros([ROWS, BLOCK_N], gl.float32, s_l), use_acc=False, is_async=True)
            _pass_turn(turn, w, PINGPONG)
            qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk_tok, ))
            p, m_new, alpha, l_i = _softmax(qk, m_i, l_i, t >= n_full, start, tok, offs_n, k_len, qk_scale, CAUSAL)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_l)), 1)
            acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_l), v_bufs.index(st), acc)
            mbarrier.arrive(kv_empty.index(st))
            m_i = m_new
    empty = l_i == 0.0
    l_safe = gl.where(empty, 1.0, l_i)
    lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe)) / 1.4426950408889634)
    out = acc / gl.expand_dims(gl.convert_layout(l_safe, gl.SliceLayout(1, o_l)), 1)
    orow_l: gl.constexpr = gl.SliceLayout(1, o_l)
    otok = i0 + w * ROWS + gl.arange(0, ROWS, layout=orow_l)
    od = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_l))
    o_ok = gl.expand_dims(otok < q_len, 1)
    o_ptrs = O + gl.expand_dims((q_start + otok).to(gl.int64) * stride_ot + head * stride_oh, 1) + gl.expand_dims(od, 0)
    gl.store(o_ptrs, out.to(O.dtype.element_ty), mask=o_ok)
    gl.store(LSE + head * stride_lh + q_start + tok, lse, mask=tok < q_len)


@gluon.jit
def _attn_fwd_sm90(q_desc, k_desc, v_desc, O, LSE, CU_Q, CU_K, DENSE, qk_scale, stride_ot, stride_oh, stride_lh,
                   sp_block, sp_window, sp_sink, sp_stride, N_TILES, HQ,
                   GROUP: gl.constexpr, CAUSAL: gl.constexpr, SPARSE: gl.constexpr, HEAD_DIM: gl.constexpr,
                   BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                   CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr, OVERLAP: gl.constexpr,
                   PINGPONG: gl.constexpr):
    # heads of a tile side by side (a GQA group shares K/V in L2), heaviest (last, for causal) tiles first
    pid = gl.program_id(0)
    head = pid % HQ
    pid_m = N_TILES - 1 - pid // HQ
    doc = gl.program_id(1)
    q_start = gl.load(CU_Q + doc)
    q_len = gl.load(CU_Q + doc + 1) - q_start
    k_start = gl.load(CU_K + doc)
    k_len = gl.load(CU_K + doc + 1) - k_start
    i0 = pid_m * BLOCK_M
    if i0 < q_len:
        hkv = head // GROUP
        if CAUSAL:
            hi = gl.minimum(k_len, i0 + BLOCK_M)
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

        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
        k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        kv_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        mbarrier.init(turn.index(0), count=1)
        mbarrier.init(turn.index(1), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(kv_ready.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=2)  # both consumer warpgroups
        gl.warp_specialize([
            # (the argument tuples are written out: a tuple held in a variable turns its constexprs into tensors)
            (_consumer, (0, q_smem, k_bufs, v_bufs, q_bar, kv_ready, kv_empty, turn, O, LSE, stride_ot, stride_oh,
                         stride_lh, head, q_start, q_len, k_len, i0, n_iter, n_full, safe_hi, lo, n_sink, n_shard,
                         first, s, sp_block, qk_scale, CAUSAL, SPARSE, HEAD_DIM, BLOCK_N, STAGES, OVERLAP, PINGPONG)),
            (_consumer, (1, q_smem, k_bufs, v_bufs, q_bar, kv_ready, kv_empty, turn, O, LSE, stride_ot, stride_oh,
                         stride_lh, head, q_start, q_len, k_len, i0, n_iter, n_full, safe_hi, lo, n_sink, n_shard,
                         first, s, sp_block, qk_scale, CAUSAL, SPARSE, HEAD_DIM, BLOCK_N, STAGES, OVERLAP, PINGPONG)),
            (_loader, (q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, kv_ready, kv_empty, q_start + i0,
                       head * HEAD_DIM, k_start, hkv * HEAD_DIM, n_iter, n_full, safe_hi, lo, n_sink, n_shard, first,
                       s, sp_block, SPARSE, BLOCK_N, STAGES)),
        ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


def _flat(x: torch.Tensor):
    t, h, d = x.shape
    if x.stride(2) != 1 or (h > 1 and x.stride(1) != d):
        return None
    return x.as_strided((t, h * d), (x.stride(0), 1))


def attention_forward(q, k, v, cu_q, cu_k, max_q: int, *, causal: bool, scale: float, sparse=None,
                      dense_heads=None, sp: tuple = (128, 1, 0, 1)):
    """q [Tq, Hq, D], k/v [Tk, Hkv, D] (heads adjacent), cu_q/cu_k int32 -> (out [Tq, Hq, D], lse fp32 [Hq, Tq])."""
    tq, hq, d = q.shape
    hkv = k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty((hq, tq), dtype=torch.float32, device=q.device)
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    lay_q = gl.NVMMASharedLayout.get_default_for([BLOCK_M, d], gdt)
    lay_k = gl.NVMMASharedLayout.get_default_for([BLOCK_N, d], gdt)
    q_desc = TensorDescriptor.from_tensor(_flat(q), [BLOCK_M, d], lay_q)
    k_desc = TensorDescriptor.from_tensor(_flat(k), [BLOCK_N, d], lay_k)
    v_desc = TensorDescriptor.from_tensor(_flat(v), [BLOCK_N, d], lay_k)
    if dense_heads is None:
        dense_heads = torch.zeros(1, dtype=torch.int32, device=q.device)
    n_tiles = triton.cdiv(max(max_q, 1), BLOCK_M)
    grid = (n_tiles * hq, cu_q.numel() - 1)
    _attn_fwd_sm90[grid](q_desc, k_desc, v_desc, out, lse, cu_q, cu_k, dense_heads, scale * LOG2E, out.stride(0),
                         out.stride(1), lse.stride(0), *sp, n_tiles, hq, GROUP=hq // hkv, CAUSAL=causal,
                         SPARSE=sparse is not None, HEAD_DIM=d, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, STAGES=STAGES,
                         CONSUMER_REGS=CONSUMER_REGS, LOADER_REGS=LOADER_REGS, OVERLAP=OVERLAP, PINGPONG=PINGPONG,
                         num_warps=4)
    return out, lse
