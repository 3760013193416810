"""Hopper (sm_90) dK/dV kernel of the attention backward in Gluon: the fast path of ``triton.attention_backward``'s
dk/dv half on H100/H200 (dq stays the Triton dq kernel's, which already runs its 3 matmuls at ~625 TFLOP/s).

Same contract as the Triton dk/dv kernel (``triton.py``): packed documents, causal top-left aligned per document pair,
GQA (the group's q heads loop inside the CTA, so each K/V tile is loaded once), the S2 block walk with dense heads,
dk/dv in the inputs' dtype or added into the ring's fp32 accumulators (``accumulate``). ``why_not`` says when it
does not apply; everything else runs the Triton kernel (and CI, under ``TRITON_INTERPRET=1``, only that).

Built like the Gluon forward (``gluon_sm90.py``): per CTA one KV tile of 128 keys of one KV head, split between TWO
consumer warpgroups in separate partitions (64 keys each, own dK/dV accumulators, 240 registers), and one TMA loader
warp that streams the q/dout tiles (64 tokens of one q head) that see those keys through a ring of ``STAGES``
buffers, freed when both consumers have arrived. Per step and consumer:

    S^T = K_w Q^T, dP^T = V_w dO^T (issued together), P^T = exp2(S^T c - lse2) (while dP^T runs),
    dV_w += P^T dO (issued), dS^T = P^T (dP^T - delta) (while dV runs), dK_w += dS^T Q

with a turn barrier between the consumers (FlashAttention-3's scheduler barrier). H200, B1 Hq32 Hkv8 D128 causal
bf16, delta + dk/dv: dense 32K 28.3 ms (Triton 33.5), 128K 456 ms (Triton 534); S2 32K 7.6 (Triton 8.6)
(bench/results/gluon_dkdv_dev_h200_2026-12-02.json); the whole backward 32K 48.8 vs 54.1 ms
(gluon_bwd_ab_h200_2026-12-02.json). ``ATOMIC_DQ`` (dq added in by fp32 register atomics, ``dkdv_into(dq=...)``)
is correct but slower there (83 ms): off by default (``triton.GLUON_ATOMIC_DQ``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .gluon_sm90 import _flat, _my_turn, _tma_load, launch_guarded, operands_why_not
from .triton import LOG2E, _bwd_delta

BLOCK_N = 128  # keys per CTA (64 per consumer)
BLOCK_M = 64  # q tokens per step
STAGES = 4  # q/dout ring depth (2 ran the same: bench/results/gluon_dkdv_dev_h200_2026-12-02.json)
DQ_SPLIT = 2  # dq's wgmma in column blocks of D / DQ_SPLIT (registers)
STAGES_ATOMIC = 4  # with dq added in (dS^T buffers: 16 KB more shared memory)
PINGPONG = 1
WAIT_DV = 0
CONSUMER_REGS = 240
LOADER_REGS = 24


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
def _consumer(w: gl.constexpr, k_smem, v_smem, q_bufs, do_bufs, ds_smem, kv_bar, q_ready, q_empty, turn,
              LSE2, DELTA, DK, DV, DQ, qk_scale, sm_scale, stride_lh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
              stride_dqt, stride_dqh, n_total, n_per, lo, q_start, q_len, k_start, k_len, j0, head_base, hkv,
              CAUSAL: gl.constexpr, ACC: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
              STAGES: gl.constexpr, PINGPONG: gl.constexpr, WAIT_DV: gl.constexpr, ATOMIC_DQ: gl.constexpr,
              DQ_SPLIT: gl.constexpr):
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
        if PINGPONG:
            _my_turn(turn, w, it)
        sT = warpgroup_mma(k_w, q_s.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        dpT = warpgroup_mma(v_w, do_s.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - w))
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
        if ATOMIC_DQ:  # dS^T through shared memory: dK += dS^T Q and this tile's dQ = dS K_w, added into fp32 DQ
            ds_w = ds_smem.index(w)
            ds_w.store(dsT)
            fence_async_shared()
            dk = warpgroup_mma(ds_w, q_s, dk, is_async=True)
            # dQ in DQ_SPLIT column blocks of the head dim (accumulator registers: 64 / DQ_SPLIT per thread)
            DQ_D: gl.constexpr = HEAD_DIM // DQ_SPLIT
            dq_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, DQ_D, 16])
            qr = start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, dq_l))
            qd = gl.arange(0, DQ_D, layout=gl.SliceLayout(0, dq_l))
            dq_row = gl.expand_dims((q_start + qr).to(gl.int64) * stride_dqt + head * stride_dqh, 1)
            for c in gl.static_range(DQ_SPLIT):
                dq = warpgroup_mma(ds_w.permute((1, 0)), k_w.slice(c * DQ_D, DQ_D, dim=1),
                                   gl.zeros([BLOCK_M, DQ_D], gl.float32, dq_l), use_acc=False, is_async=True)
                if c == DQ_SPLIT - 1:
                    dk, dv, dq = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv, dq))
                    mbarrier.arrive(q_empty.index(st))
                else:
                    dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq, ))
                gl.atomic_add(DQ + dq_row + gl.expand_dims(c * DQ_D + qd, 0), dq * sm_scale,
                              mask=gl.expand_dims(qr < q_len, 1), sem="relaxed")
        else:
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
def _attn_dkdv_sm90(q_desc, k_desc, v_desc, do_desc, LSE2, DELTA, DK, DV, DQ, CU_Q, CU_K, DENSE,
                    qk_scale, sm_scale, stride_lh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_dqt,
                    stride_dqh, sp_block, sp_window, sp_sink, sp_stride, N_KV,
                    GROUP: gl.constexpr, CAUSAL: gl.constexpr, SPARSE: gl.constexpr, ACC: gl.constexpr,
                    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                    PINGPONG: gl.constexpr, CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
                    WAIT_DV: gl.constexpr, ATOMIC_DQ: gl.constexpr, DQ_SPLIT: gl.constexpr):
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
        # dS^T of each consumer ([64 keys, 64 q], rows of 128 bytes: q_desc's swizzle fits) when dq is added here
        ds_smem = gl.allocate_shared_memory(dtype, [2 if ATOMIC_DQ else 1, BLOCK_M, BLOCK_M], q_desc.layout)
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
            (_consumer, (0, k_smem, v_smem, q_bufs, do_bufs, ds_smem, kv_bar, q_ready, q_empty, turn, LSE2, DELTA,
                         DK, DV, DQ, qk_scale, sm_scale, stride_lh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                         stride_dqt, stride_dqh, n_total, n_per, lo, q_start, q_len, k_start, k_len, j0, head_base,
                         hkv, CAUSAL, ACC, HEAD_DIM, BLOCK_M, STAGES, PINGPONG, WAIT_DV, ATOMIC_DQ, DQ_SPLIT)),
            (_consumer, (1, k_smem, v_smem, q_bufs, do_bufs, ds_smem, kv_bar, q_ready, q_empty, turn, LSE2, DELTA,
                         DK, DV, DQ, qk_scale, sm_scale, stride_lh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                         stride_dqt, stride_dqh, n_total, n_per, lo, q_start, q_len, k_start, k_len, j0, head_base,
                         hkv, CAUSAL, ACC, HEAD_DIM, BLOCK_M, STAGES, PINGPONG, WAIT_DV, ATOMIC_DQ, DQ_SPLIT)),
            (_loader, (q_desc, do_desc, k_desc, v_desc, k_smem, v_smem, q_bufs, do_bufs, kv_bar, q_ready, q_empty,
                       n_total, n_per, lo, q_start, head_base, k_start + j0, hkv, HEAD_DIM, BLOCK_M, STAGES)),
        ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


# ----------------------------------------------------------------------------------------------- host side

_BROKEN: list = []  # the first launch error, after which this path is off for the process


def why_not(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, lse: torch.Tensor,
            sparse) -> Optional[str]:
    """None when this dk/dv kernel applies (``do`` in q's dtype), else the reason (the Triton kernel then runs)."""
    why = operands_why_not(_BROKEN, (q, k, v, do), "q, k, v, dout", sparse, BLOCK_N)
    if why is None and lse.stride(1) != 1:
        return "lse needs token stride 1"
    return why


def prep(do: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (delta, lse2), fp32 with lse's strides: delta = rowsum(out * dout) (what the Triton dq kernel takes) and
    lse2 = lse * log2(e) with -inf -> +inf (this kernel's form)."""
    tq, hq, d = out.shape
    delta = torch.empty_strided(lse.shape, lse.stride(), dtype=torch.float32, device=lse.device)
    lse2 = torch.empty_strided(lse.shape, lse.stride(), dtype=torch.float32, device=lse.device)
    _bwd_delta[(triton.cdiv(tq, 64), hq)](out, do, delta, tq, out.stride(0), out.stride(1), do.stride(0),
                                          do.stride(1), delta.stride(0), HEAD_DIM=d, BLOCK=64, LSE=lse, LSE2=lse2)
    return delta, lse2


def dkdv_into(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, delta: torch.Tensor,
              lse2: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_k: int, dense: torch.Tensor, sp: tuple,
              dk: torch.Tensor, dv: torch.Tensor, *, causal: bool, scale: float, sparse: bool,
              accumulate: bool, dq: Optional[torch.Tensor] = None) -> bool:
    """dK, dV of ``triton.attention_backward`` into its ``dk``/``dv`` (added in when ``accumulate``); ``delta``/
    ``lse2`` from ``prep``, ``dense``/``sp`` = (block, window, sink, stride) as the Triton driver builds them. False
    when the launch failed: the caller then runs the Triton kernel, and this path stays off with a warning.
    ``dq``: an fp32 [Tq, Hq, D] buffer (last dim contiguous) that each tile's share of dq is added into by atomics
    (5 matmuls per tile pair; without it dq is the Triton dq kernel's, 3 more)."""
    tq, hq, d = q.shape
    atomic = dq is not None
    dq_ = dq if atomic else dk
    hkv = k.shape[1]
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    lay_q = gl.NVMMASharedLayout.get_default_for([BLOCK_M, d], gdt)
    lay_k = gl.NVMMASharedLayout.get_default_for([BLOCK_N, d], gdt)
    grid = (triton.cdiv(max(max_k, 1), BLOCK_N) * hkv, cu_q.numel() - 1)

    def launch():
        q_desc = TensorDescriptor.from_tensor(_flat(q), [BLOCK_M, d], lay_q)
        do_desc = TensorDescriptor.from_tensor(_flat(do), [BLOCK_M, d], lay_q)
        k_desc = TensorDescriptor.from_tensor(_flat(k), [BLOCK_N, d], lay_k)
        v_desc = TensorDescriptor.from_tensor(_flat(v), [BLOCK_N, d], lay_k)
        _attn_dkdv_sm90[grid](q_desc, k_desc, v_desc, do_desc, lse2, delta, dk, dv, dq_, cu_q, cu_k, dense,
                              scale * LOG2E, scale, lse2.stride(0), dk.stride(0), dk.stride(1), dv.stride(0),
                              dv.stride(1), dq_.stride(0), dq_.stride(1), *sp, hkv, GROUP=hq // hkv, CAUSAL=causal,
                              SPARSE=sparse, ACC=accumulate, HEAD_DIM=d, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                              STAGES=STAGES_ATOMIC if atomic else STAGES, PINGPONG=PINGPONG,
                              CONSUMER_REGS=CONSUMER_REGS, LOADER_REGS=LOADER_REGS, WAIT_DV=WAIT_DV,
                              ATOMIC_DQ=atomic, DQ_SPLIT=DQ_SPLIT if atomic else 1, num_warps=4)

    return launch_guarded(_BROKEN, "dk/dv kernel", launch)
