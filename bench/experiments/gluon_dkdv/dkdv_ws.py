"""Hopper (sm_90) dK/dV kernel of the attention backward in Gluon, built like the package's Gluon forward
(``longreach/kernels/flash/gluon_sm90.py``): per CTA one KV tile of 128 keys of one KV head, split between TWO
independent consumer warpgroups (separate partitions, 64 keys each, each with its own dK/dV accumulators), and one
TMA loader warp that streams the q/dout tiles (64 tokens of each q head of the GQA group) that see those keys into a
ring of ``STAGES`` buffers, freed when both consumers are done with them. Per step and consumer (4 matmuls, as the
Triton dk/dv kernel; dq stays the Triton dq kernel's):

    S^T = K_w Q^T, dP^T = V_w dO^T (issued together), P^T = exp2(S^T c - lse2) (while dP^T runs),
    dV_w += P^T dO (issued), dS^T = P^T (dP^T - delta) (while dV runs), dK_w += dS^T Q

``PINGPONG``: the consumers take turns issuing their S^T/dP^T (FlashAttention-3's scheduler barrier).

Why: the Triton dk/dv kernel is 63% of the dense backward (34.8 of 55.2 ms at 32K on the H200) at ~506 TFLOP/s; the
fused Gluon backward (``../gluon_bwd``) ran its 4 matmuls at the same speed with the two warpgroups in ONE partition
(lockstep). Splitting the warpgroups into independent partitions with a turn barrier made the forward 1.15x faster.
Status: compile-checked for sm_90a (``compile.py``); not yet run on a GPU (``dev.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

LOG2E = 1.4426950408889634
BLOCK_N = 128  # keys per CTA (64 per consumer)
BLOCK_M = 64  # q tokens per step
STAGES = 4
PINGPONG = 1
WAIT_DV = 0
CONSUMER_REGS = 240
LOADER_REGS = 24


@triton.jit
def _prep(O, DO, LSE, DELTA, LSE2, T, stride_ot, stride_oh, stride_dot, stride_doh, stride_lh, stride_dh,
          HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    # delta[h, t] = sum_d out * dout, and lse2 = lse * log2(e) with -inf (a row that saw no key) -> +inf (p = 0)
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    h = tl.program_id(1)
    d = tl.arange(0, HEAD_DIM)
    ok = t < T
    t64 = t.to(tl.int64)
    o = tl.load(O + t64[:, None] * stride_ot + h * stride_oh + d[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(DO + t64[:, None] * stride_dot + h * stride_doh + d[None, :], mask=ok[:, None], other=0.0)
    tl.store(DELTA + h * stride_dh + t64, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=ok)
    lse = tl.load(LSE + h * stride_lh + t64, mask=ok, other=0.0)
    tl.store(LSE2 + h * stride_dh + t64, tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634),
             mask=ok)


@gluon.jit
def _step(it, n_per, lo, head_base, BLOCK_M: gl.constexpr):
    # flat step -> (q head, first token of its q tile in the document)
    g = it // gl.maximum(n_per, 1)
    return head_base + g, lo + (it - g * n_per) * BLOCK_M


@gluon.jit
def _loader(q_desc, do_desc, k_desc, v_desc, k_smem, v_smem, q_bufs, do_bufs, kv_bar, q_ready, q_empty,
            n_total, n_per, lo, q_start, head_base, k_row, hkv,
            HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    _tma_load(k_desc, [k_row, hkv * HEAD_DIM], kv_bar, k_smem)
    _tma_load(v_desc, [k_row, hkv * HEAD_DIM], kv_bar, v_smem)
    for it in range(n_total):
        st = it % STAGES
        mbarrier.wait(q_empty.index(st), ((it // STAGES) & 1) ^ 1)
        head, start = _step(it, n_per, lo, head_base, BLOCK_M)
        bar = q_ready.index(st)
        mbarrier.expect(bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        _tma_load(q_desc, [q_start + start, head * HEAD_DIM], bar, q_bufs.index(st))
        _tma_load(do_desc, [q_start + start, head * HEAD_DIM], bar, do_bufs.index(st))


@gluon.jit
def _my_turn(turn, w: gl.constexpr, t, PINGPONG: gl.constexpr):
    # consumer 0 issues step t after consumer 1 issued step t-1; consumer 1 after consumer 0 issued step t
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
def _consumer(w: gl.constexpr, k_smem, v_smem, q_bufs, do_bufs, kv_bar, q_ready, q_empty, turn,
              LSE2, DELTA, DK, DV, qk_scale, sm_scale, stride_lh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
              n_total, n_per, lo, q_start, q_len, k_start, k_len, j0, head_base, hkv,
              CAUSAL: gl.constexpr, ACC: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
              STAGES: gl.constexpr, PINGPONG: gl.constexpr, WAIT_DV: gl.constexpr):
    ROWS: gl.constexpr = 64  # keys of this consumer
    s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_M, 16])
    kv_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                   instr_shape=[16, HEAD_DIM, 16])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_l, k_width=2)
    col_l: gl.constexpr = gl.SliceLayout(0, s_l)  # per q row (S^T columns)
    row_l: gl.constexpr = gl.SliceLayout(1, s_l)  # per key (S^T rows)
    dtype: gl.constexpr = k_smem.dtype
    jw = j0 + w * ROWS  # this consumer's first key
    k_w = k_smem.slice(w * ROWS, ROWS, dim=0)
    v_w = v_smem.slice(w * ROWS, ROWS, dim=0)
    kv_partial = jw + ROWS > k_len
    dk = gl.zeros([ROWS, HEAD_DIM], gl.float32, kv_l)
    dv = gl.zeros([ROWS, HEAD_DIM], gl.float32, kv_l)
    cols = jw + gl.arange(0, ROWS, layout=row_l)  # key index in the document
    # lse/delta come in one value per thread and move to the S^T column layout (16 per thread) only when used:
    # loading them in that layout kept 16 pointers per thread live (spills)
    b1: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    offs_b = gl.arange(0, BLOCK_M, layout=b1)
    mbarrier.wait(kv_bar, 0)
    for it in range(n_total):
        st = it % STAGES
        head, start = _step(it, n_per, lo, head_base, BLOCK_M)
        tok_b = start + offs_b
        ok_b = tok_b < q_len
        mbarrier.wait(q_ready.index(st), (it // STAGES) & 1)
        q_s = q_bufs.index(st)
        do_s = do_bufs.index(st)
        s_zero = gl.zeros([ROWS, BLOCK_M], gl.float32, s_l)
        _my_turn(turn, w, it, PINGPONG)
        sT = warpgroup_mma(k_w, q_s.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        dpT = warpgroup_mma(v_w, do_s.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        _pass_turn(turn, w, PINGPONG)
        # (lse/delta loaded under the matmuls, not kept live through them: registers)
        lse_b = gl.load(LSE2 + head * stride_lh + q_start + tok_b, mask=ok_b, other=float("inf"))
        delta_b = gl.load(DELTA + head * stride_lh + q_start + tok_b, mask=ok_b, other=0.0)
        sT = warpgroup_mma_wait(num_outstanding=1, deps=(sT, ))
        pT = gl.exp2(sT * qk_scale - gl.expand_dims(gl.convert_layout(lse_b, col_l), 0))
        masked = kv_partial | (start + BLOCK_M > q_len)
        if CAUSAL:
            masked = masked | (start < jw + ROWS)
        if masked:
            tok = start + gl.arange(0, BLOCK_M, layout=col_l)
            ok = gl.expand_dims(cols < k_len, 1) & gl.expand_dims(tok < q_len, 0)
            if CAUSAL:
                ok = ok & (gl.expand_dims(cols, 1) <= gl.expand_dims(tok, 0))
            pT = gl.where(ok, pT, 0.0)
        dv = warpgroup_mma(gl.convert_layout(pT.to(dtype), a_l), do_s, dv, is_async=True)
        if WAIT_DV:  # P^T's registers free before dS^T (registers), at the cost of dV's overlap with it
            dpT, dv = warpgroup_mma_wait(num_outstanding=0, deps=(dpT, dv))
        else:
            dpT = warpgroup_mma_wait(num_outstanding=1, deps=(dpT, ))
        dsT = (pT * (dpT - gl.expand_dims(gl.convert_layout(delta_b, col_l), 0))).to(dtype)
        dk = warpgroup_mma(gl.convert_layout(dsT, a_l), q_s, dk, is_async=True)
        dk, dv = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv))
        mbarrier.arrive(q_empty.index(st))
    dk = dk * sm_scale
    o_l: gl.constexpr = gl.SliceLayout(1, kv_l)
    d_l: gl.constexpr = gl.SliceLayout(0, kv_l)
    ck = jw + gl.arange(0, ROWS, layout=o_l)
    cd = gl.arange(0, HEAD_DIM, layout=d_l)
    ok2 = gl.expand_dims(ck < k_len, 1)
    rows = (k_start + ck).to(gl.int64)
    dk_ptrs = DK + gl.expand_dims(rows * stride_dkt + hkv * stride_dkh, 1) + gl.expand_dims(cd, 0)
    dv_ptrs = DV + gl.expand_dims(rows * stride_dvt + hkv * stride_dvh, 1) + gl.expand_dims(cd, 0)
    if ACC:
        dk += gl.load(dk_ptrs, mask=ok2, other=0.0)
        dv += gl.load(dv_ptrs, mask=ok2, other=0.0)
    gl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=ok2)
    gl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=ok2)


@gluon.jit
def _attn_dkdv_sm90(q_desc, k_desc, v_desc, do_desc, LSE2, DELTA, DK, DV, CU_Q, CU_K, DENSE,
                    qk_scale, sm_scale, stride_lh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                    sp_block, sp_window, sp_sink, sp_stride, N_KV,
                    GROUP: gl.constexpr, CAUSAL: gl.constexpr, SPARSE: gl.constexpr, ACC: gl.constexpr,
                    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                    PINGPONG: gl.constexpr, CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
                    WAIT_DV: gl.constexpr):
    # kv heads of a tile side by side; first tiles first (for causal they see the most queries)
    pid = gl.program_id(0)
    doc = gl.program_id(1)
    hkv = pid % N_KV
    pid_n = pid // N_KV
    q_start = gl.load(CU_Q + doc)
    q_len = gl.load(CU_Q + doc + 1) - q_start
    k_start = gl.load(CU_K + doc)
    k_len = gl.load(CU_K + doc + 1) - k_start
    j0 = pid_n * BLOCK_N
    if j0 < k_len:
        dtype: gl.constexpr = k_desc.dtype
        k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], v_desc.layout)
        q_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
        do_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], do_desc.layout)
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        mbarrier.init(turn.index(0), count=1)
        mbarrier.init(turn.index(1), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=2)  # both consumers
        # the q range that sees this KV tile: causal from its first key; S2: the window's q blocks, or all later
        # ones for a sink / on-shard key block
        q_hi = q_len
        if SPARSE:
            kb = j0 // sp_block
            dense = gl.load(DENSE + hkv)
            s = gl.where(dense != 0, 1, sp_stride)
            everyone = (kb < sp_sink) | (kb % s == hkv % s)
            q_hi = gl.where(everyone, q_len, gl.minimum(q_len, (kb + sp_window) * sp_block))
        if CAUSAL:
            lo = j0
        else:
            lo = j0 * 0
        n_per = gl.cdiv(gl.maximum(q_hi - lo, 0), BLOCK_M)
        n_total = n_per * GROUP
        head_base = hkv * GROUP
        gl.warp_specialize([
            (_consumer, (0, k_smem, v_smem, q_bufs, do_bufs, kv_bar, q_ready, q_empty, turn, LSE2, DELTA, DK, DV,
                         qk_scale, sm_scale, stride_lh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, n_total,
                         n_per, lo, q_start, q_len, k_start, k_len, j0, head_base, hkv, CAUSAL, ACC, HEAD_DIM,
                         BLOCK_M, STAGES, PINGPONG, WAIT_DV)),
            (_consumer, (1, k_smem, v_smem, q_bufs, do_bufs, kv_bar, q_ready, q_empty, turn, LSE2, DELTA, DK, DV,
                         qk_scale, sm_scale, stride_lh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, n_total,
                         n_per, lo, q_start, q_len, k_start, k_len, j0, head_base, hkv, CAUSAL, ACC, HEAD_DIM,
                         BLOCK_M, STAGES, PINGPONG, WAIT_DV)),
            (_loader, (q_desc, do_desc, k_desc, v_desc, k_smem, v_smem, q_bufs, do_bufs, kv_bar, q_ready, q_empty,
                       n_total, n_per, lo, q_start, head_base, k_start + j0, hkv, HEAD_DIM, BLOCK_M, STAGES)),
        ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


def _flat(x: torch.Tensor):
    t, h, d = x.shape
    assert x.stride(2) == 1 and (h == 1 or x.stride(1) == d), "heads must be adjacent"
    return x.as_strided((t, h * d), (x.stride(0), 1))


def prep(do, out, lse):
    """-> (delta, lse2), fp32 [Hq, Tq]."""
    tq, hq, d = out.shape
    delta = torch.empty((hq, tq), dtype=torch.float32, device=out.device)
    lse2 = torch.empty_like(delta)
    _prep[(triton.cdiv(tq, 64), hq)](out, do, lse, delta, lse2, tq, out.stride(0), out.stride(1), do.stride(0),
                                     do.stride(1), lse.stride(0), delta.stride(0), HEAD_DIM=d, BLOCK=64)
    return delta, lse2


def dkdv(do, q, k, v, delta, lse2, cu_q, cu_k, max_k: int, *, causal: bool, scale: float, dk=None, dv=None,
         accumulate: bool = False, sparse=None):
    """dK, dV (q's dtype, or added into fp32 ``dk``/``dv`` when ``accumulate``) of ``triton.attention_backward``'s
    contract; ``sparse``: its SparseArgs."""
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    if dk is None:
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    lay_q = gl.NVMMASharedLayout.get_default_for([BLOCK_M, d], gdt)
    lay_k = gl.NVMMASharedLayout.get_default_for([BLOCK_N, d], gdt)
    q_desc = TensorDescriptor.from_tensor(_flat(q), [BLOCK_M, d], lay_q)
    do_desc = TensorDescriptor.from_tensor(_flat(do), [BLOCK_M, d], lay_q)
    k_desc = TensorDescriptor.from_tensor(_flat(k), [BLOCK_N, d], lay_k)
    v_desc = TensorDescriptor.from_tensor(_flat(v), [BLOCK_N, d], lay_k)
    if sparse is None:
        dense, sp = torch.zeros(1, dtype=torch.int32, device=q.device), (128, 1, 0, 1)
    else:
        dense, sp = sparse.dense_heads, (sparse.block, sparse.window_blocks, sparse.sink_blocks, sparse.stride)
    grid = (triton.cdiv(max(max_k, 1), BLOCK_N) * hkv, cu_q.numel() - 1)
    _attn_dkdv_sm90[grid](q_desc, k_desc, v_desc, do_desc, lse2, delta, dk, dv, cu_q, cu_k, dense, scale * LOG2E,
                          scale, lse2.stride(0), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), *sp, hkv,
                          GROUP=hq // hkv, CAUSAL=causal, SPARSE=sparse is not None, ACC=accumulate, HEAD_DIM=d,
                          BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, STAGES=STAGES, PINGPONG=PINGPONG,
                          CONSUMER_REGS=CONSUMER_REGS, LOADER_REGS=LOADER_REGS, WAIT_DV=WAIT_DV, num_warps=4)
    return dk, dv
