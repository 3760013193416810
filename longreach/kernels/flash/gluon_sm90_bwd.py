"""Hopper (sm_90) dK/dV kernel of the attention backward in Gluon: the fast path of ``triton.attention_backward``'s
dk/dv half on H100/H200, with dq in the same pass (``ATOMIC_DQ``, below) or by the Triton dq kernel.

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

with a turn barrier between the consumers (FlashAttention-3's scheduler barrier; off with dq added in, below). The
loader also puts each step's lse2/delta in shared memory (``LSE_SMEM``), which the consumers read in the S^T column
layout: no global loads and no layout shuffles (partition barriers) in their loop.
H200, B1 Hq32 Hkv8 D128 causal bf16, delta + dk/dv: dense 32K 28.3 ms (Triton 33.5), 128K 456 ms (Triton 534); S2
32K 7.6 (Triton 8.6) (bench/results/gluon_dkdv_dev_h200_2026-12-02.json).

``ATOMIC_DQ`` (``dkdv_into(dq=...)``, the default where ``triton.GLUON_ATOMIC_DQ`` says): dq in the same pass, added
into an fp32 buffer by TMA reduce-adds (5 matmuls per tile pair instead of 7). Mode 1, FlashAttention-3's split:
both consumers' dS^T go to one double-buffered [128 keys, 64 q] shared tile (an mbarrier says both are there), and
consumer w computes dQ's head-dim columns [w D/2, (w+1) D/2) over all 128 keys, stages them in fp32 shared memory
and issues one reduce-add (waited, read side only, a step later); its dK takes dS^T from registers and the turn
barrier is off (``DK_RS``, ``PINGPONG_FUSED``: 2-4% faster). Whole backward, dense 32K 45.2 ms vs 48.9 with
the Triton dq kernel; a long sequence runs in q chunks (``q_range``), 128K 718 vs 783
(bench/results/gluon_bwd_sweep_*_h200_2026-12-02.json). Each consumer adding its own keys' share instead (twice
the traffic) ran 56-59 ms, dQ in two wgmmas 56, fp32 register atomics 83. S2 runs its q rows in chunks of 6144 from
24K tokens on (``triton.S2_BWD_CHUNK``): an on-shard KV tile sees every later q row, and in one launch those tiles
walk them at unrelated phases (L2 hit 32% vs 85% dense); in chunks the CTAs of a launch share the chunk's q/dout and
dq rows in L2 (32K 12.5-12.7 ms vs 13.3-14.1, 128K 120.5 vs 128.5-129.4; a KV tile that sees none of a chunk returns
at once).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton._C.libtriton import ir
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .gluon_sm90 import _flat, _my_turn, _tma_load, launch_guarded, operands_why_not
from .triton import LOG2E, _bwd_delta

BLOCK_N = 128  # keys per CTA (64 per consumer)
BLOCK_M = 64  # q tokens per step
STAGES = 4  # q/dout ring depth (2 ran the same: bench/results/gluon_dkdv_dev_h200_2026-12-02.json)
STAGES_ATOMIC = 2  # with dq added in (dS^T and dQ buffers: 64 KB more shared memory)
PINGPONG = 1
# with dq added in: no turn barrier, and dK's dS^T operand from registers (DK_RS) rather than the shared tile both
# consumers write for dQ (one shared-memory read less per step, the kernel being bound there). H200, backward alone,
# 2 rounds (bench/results/gluon_bwd_knobs_h200_2026-12-03.json): dense 32K 43.8 / 45.8 ms vs 45.7 / 45.8, 128K
# 706 / 708 vs 723 / 728; S2 32K 11.97 / 12.12 vs 12.47 / 12.89, 128K 116.4 / 116.5 vs 120.1 / 120.1 (DK_RS with the
# barrier: 128K dense 964)
PINGPONG_FUSED = 0
WAIT_DV = 0
WAIT_DV_FUSED = 1  # with dq added in: dV waited before dS^T (spills 204 -> 108 B; 32K 45.8 vs 51.9 ms)
DK_RS = 1
# lse2/delta put in shared memory by the loader warp with each step's q/dout, read by the consumers in the S^T column
# layout (no global loads and no layout shuffle in the consumers: 4 partition barriers fewer per step, ptxas spills
# 112 -> 8 B with dq added in). H200, backward alone, 2 rounds (bench/results/gluon_bwd_knobs3_h200_2026-12-03.json):
# dense 32K 42.1 / 42.6 ms vs 44.5 / 45.8, 128K 719 / 708 vs 713 / 713; S2 32K 11.25 / 11.38 vs 12.12 / 12.51, 128K
# 109.7 / 109.8 vs 118.5 / 118.0
LSE_SMEM = 1
# dQ issued before dK and staged / sent while dK runs (FlashAttention-3's order): slower here (same runs: dense 32K
# 44.6 / 43.9 with LSE_SMEM, 128K 826 / 811; S2 32K 11.5 / 11.7, 128K 112.8 / 112.6)
DQ_FIRST = 0
CONSUMER_REGS = 240
LOADER_REGS = 24


@builtin
def _tma_reduce_add_36(tensor_desc, coord, src, _semantic=None):
    # shared -> global TMA reduce-add (cp.reduce.async.bulk.tensor .add): Triton 3.6's Gluon has the op but not the
    # wrapper (3.9: tma.async_atomic_add); the issuing threads' bulk group, waited on by tma.store_wait
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


_tma_reduce_add = getattr(tma, "async_atomic_add", None) or _tma_reduce_add_36
# the CTA (partition) barrier: gl.thread_barrier in Triton 3.6, gl.barrier in 3.9
_barrier = getattr(gl, "thread_barrier", None) or gl.barrier


@gluon.jit
def _step(it, n_per, lo, head_base, BLOCK_M: gl.constexpr):
    # flat step -> (q head, first token of its q tile in the document)
    g = it // gl.maximum(n_per, 1)
    return head_base + g, lo + (it - g * n_per) * BLOCK_M


@gluon.jit
def _loader(q_desc, do_desc, k_desc, v_desc, k_smem, v_smem, q_bufs, do_bufs, kv_bar, q_ready, q_empty,
            n_total, n_per, lo, q_start, head_base, k_row, hkv, LSE2, DELTA, stride_lh, q_len, lse_smem, dl_smem,
            HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, LSE_SMEM: gl.constexpr):
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
        if LSE_SMEM:  # this step's lse2/delta into shared memory too (the second arrival on its barrier)
            ld_l: gl.constexpr = gl.BlockedLayout([BLOCK_M // 32], [32], [1], [0])
            tok = start + gl.arange(0, BLOCK_M, layout=ld_l)
            ok = tok < q_len
            lse_smem.index(st).store(gl.load(LSE2 + head * stride_lh + q_start + tok, mask=ok, other=float("inf")))
            dl_smem.index(st).store(gl.load(DELTA + head * stride_lh + q_start + tok, mask=ok, other=0.0))
            _barrier()  # the warp's stores before its one arrive (which releases them)
            mbarrier.arrive(bar)


@gluon.jit
def _consumer(w: gl.constexpr, k_smem, v_smem, q_bufs, do_bufs, ds_smem, dq_smem, lse_smem, dl_smem, kv_bar, q_ready,
              q_empty, turn, ds_ready, LSE2, DELTA, DK, DV, dq_desc, qk_scale, sm_scale, stride_lh, stride_dkt, stride_dkh,
              stride_dvt, stride_dvh, n_total, n_per, lo, q_start, q_len, k_start, k_len, j0, head_base, hkv,
              CAUSAL: gl.constexpr, ACC: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
              STAGES: gl.constexpr, PINGPONG: gl.constexpr, WAIT_DV: gl.constexpr, ATOMIC_DQ: gl.constexpr,
              DK_RS: gl.constexpr, DQ_FIRST: gl.constexpr, LSE_SMEM: gl.constexpr):
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
        if LSE_SMEM:  # the loader put them in shared memory: read in the S^T column layout, no shuffle
            sT = warpgroup_mma_wait(num_outstanding=1, deps=(sT, ))
            pT = gl.exp2(sT * qk_scale - gl.expand_dims(lse_smem.index(st).load(col_l), 0))
        else:
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
        if LSE_SMEM:
            delta_c = dl_smem.index(st).load(col_l)
        else:
            delta_c = gl.convert_layout(delta_b, col_l)
        dsT = (pT * (dpT - gl.expand_dims(delta_c, 0))).to(dtype)
        if ATOMIC_DQ:  # dS^T through shared memory; this tile's dQ added into the fp32 DQ by a TMA reduce-add
            # both consumers' dS^T make one [128 keys, 64 q] buffer (double-buffered): consumer w takes dQ's head-dim
            # columns [w D/2, (w+1) D/2) over all 128 keys (FlashAttention-3's split: each dQ element added once)
            ds_buf = ds_smem.index(it % 2)
            ds_w = ds_buf.slice(w * ROWS, ROWS, dim=0)
            ds_w.store(dsT)
            fence_async_shared()
            _barrier()  # all 128 threads' stores fenced before the one-thread arrive
            mbarrier.arrive(ds_ready.index(it % 2))
            DQ_C: gl.constexpr = HEAD_DIM // 2
            dq_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, DQ_C, 16])
            dq_w = dq_smem.index(w)  # fp32 dQ staged in shared memory, out by one reduce-add
            if DQ_FIRST:  # FlashAttention-3's order: dQ issued before dK, staged and sent while dK runs
                mbarrier.wait(ds_ready.index(it % 2), (it // 2) & 1)
                dq = warpgroup_mma(ds_buf.permute((1, 0)), k_smem.slice(w * DQ_C, DQ_C, dim=1),
                                   gl.zeros([BLOCK_M, DQ_C], gl.float32, dq_l), use_acc=False, is_async=True)
                if DK_RS:
                    dk = warpgroup_mma(gl.convert_layout(dsT, a_l), q_s, dk, is_async=True)
                else:
                    dk = warpgroup_mma(ds_w, q_s, dk, is_async=True)
                dv, dq = warpgroup_mma_wait(num_outstanding=1, deps=(dv, dq))  # (dK may still run)
                tma.store_wait(0)  # the previous step's reduce-add has read this consumer's fp32 dQ buffer
                _barrier()
                dq_w.store(dq * sm_scale)
                fence_async_shared()
                _barrier()
                _tma_reduce_add(dq_desc, [q_start + start, head * HEAD_DIM + w * DQ_C], dq_w)
                dk = warpgroup_mma_wait(num_outstanding=0, deps=(dk, ))
                mbarrier.arrive(q_empty.index(st))
            else:
                if DK_RS:  # dS^T from registers (no shared-memory read of it for dK)
                    dk = warpgroup_mma(gl.convert_layout(dsT, a_l), q_s, dk, is_async=True)
                else:
                    dk = warpgroup_mma(ds_w, q_s, dk, is_async=True)
                mbarrier.wait(ds_ready.index(it % 2), (it // 2) & 1)
                tma.store_wait(0)  # the previous step's reduce-add has read this consumer's fp32 dQ buffer
                _barrier()
                dq = warpgroup_mma(ds_buf.permute((1, 0)), k_smem.slice(w * DQ_C, DQ_C, dim=1),
                                   gl.zeros([BLOCK_M, DQ_C], gl.float32, dq_l), use_acc=False, is_async=True)
                dk, dv, dq = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv, dq))
                mbarrier.arrive(q_empty.index(st))
                dq_w.store(dq * sm_scale)
                fence_async_shared()
                _barrier()
                _tma_reduce_add(dq_desc, [q_start + start, head * HEAD_DIM + w * DQ_C], dq_w)
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
def _attn_dkdv_sm90(q_desc, k_desc, v_desc, do_desc, dq_desc, LSE2, DELTA, DK, DV, CU_Q, CU_K, DENSE,
                    qk_scale, sm_scale, stride_lh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, sp_block, sp_window,
                    sp_sink, sp_stride, N_KV, q_lo, q_lim, k_skip,
                    GROUP: gl.constexpr, CAUSAL: gl.constexpr, SPARSE: gl.constexpr, ACC: gl.constexpr,
                    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                    PINGPONG: gl.constexpr, CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
                    WAIT_DV: gl.constexpr, ATOMIC_DQ: gl.constexpr, CHUNK: gl.constexpr,
                    DK_RS: gl.constexpr, DQ_FIRST: gl.constexpr, LSE_SMEM: gl.constexpr):
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
    # q_lo/q_lim: the q rows (in each document) of this launch, a chunk of a long sequence; k_skip: KV tiles from
    # there on see none of them (causal, dk/dv added in: nothing to do)
    if (j0 < k_len) & ((not CHUNK) | (j0 < k_skip)):
        dtype: gl.constexpr = k_desc.dtype
        k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], v_desc.layout)
        q_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
        do_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], do_desc.layout)
        ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        if ATOMIC_DQ:  # dS^T of both consumers, double-buffered ([128 keys, 64 q]: rows of 128 bytes, q's swizzle
            # fits), and each consumer's fp32 dQ columns on their way to the TMA reduce-add
            ds_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, BLOCK_M], q_desc.layout)
            dq_smem = gl.allocate_shared_memory(gl.float32, [2, BLOCK_M, HEAD_DIM // 2], dq_desc.layout)
            mbarrier.init(ds_ready.index(0), count=2)
            mbarrier.init(ds_ready.index(1), count=2)
        else:
            ds_smem = ds_ready
            dq_smem = ds_ready
        st_l: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
        lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], st_l)  # (LSE_SMEM: lse2, delta)
        dl_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], st_l)
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        mbarrier.init(turn.index(0), count=1)
        mbarrier.init(turn.index(1), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(q_ready.index(i), count=2 if LSE_SMEM else 1)  # (the TMA expect, the loader's lse)
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
        if CHUNK:
            q_hi = gl.minimum(q_hi, q_lim)
            lo = gl.maximum(lo, q_lo)
        n_per = gl.cdiv(gl.maximum(q_hi - lo, 0), BLOCK_M)
        n_total = n_per * GROUP
        head_base = hkv * GROUP
        if (not CHUNK) | (n_total > 0):  # a chunk (dk/dv added in): nothing to do for a KV tile that sees none of it
            gl.warp_specialize([
                (_consumer, (0, k_smem, v_smem, q_bufs, do_bufs, ds_smem, dq_smem, lse_smem, dl_smem, kv_bar, q_ready,
                             q_empty, turn,
                             ds_ready, LSE2, DELTA, DK, DV, dq_desc, qk_scale, sm_scale, stride_lh, stride_dkt,
                             stride_dkh, stride_dvt, stride_dvh, n_total, n_per, lo, q_start, q_len, k_start, k_len, j0,
                             head_base, hkv, CAUSAL, ACC, HEAD_DIM, BLOCK_M, STAGES, PINGPONG, WAIT_DV, ATOMIC_DQ,
                             DK_RS, DQ_FIRST, LSE_SMEM)),
                (_consumer, (1, k_smem, v_smem, q_bufs, do_bufs, ds_smem, dq_smem, lse_smem, dl_smem, kv_bar, q_ready,
                             q_empty, turn,
                             ds_ready, LSE2, DELTA, DK, DV, dq_desc, qk_scale, sm_scale, stride_lh, stride_dkt,
                             stride_dkh, stride_dvt, stride_dvh, n_total, n_per, lo, q_start, q_len, k_start, k_len, j0,
                             head_base, hkv, CAUSAL, ACC, HEAD_DIM, BLOCK_M, STAGES, PINGPONG, WAIT_DV, ATOMIC_DQ,
                             DK_RS, DQ_FIRST, LSE_SMEM)),
                (_loader, (q_desc, do_desc, k_desc, v_desc, k_smem, v_smem, q_bufs, do_bufs, kv_bar, q_ready, q_empty,
                           n_total, n_per, lo, q_start, head_base, k_start + j0, hkv, LSE2, DELTA, stride_lh, q_len,
                           lse_smem, dl_smem, HEAD_DIM, BLOCK_M, STAGES, LSE_SMEM)),
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


def dq_buffer_ok(dq: torch.Tensor) -> bool:
    """Whether ``dkdv_into`` can add dq into this buffer by TMA: fp32, heads adjacent, 16-byte-aligned rows."""
    return dq.dtype == torch.float32 and _flat(dq) is not None and dq.stride(0) % 4 == 0 and \
        dq.data_ptr() % 16 == 0


def dkdv_into(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, delta: torch.Tensor,
              lse2: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_k: int, dense: torch.Tensor, sp: tuple,
              dk: torch.Tensor, dv: torch.Tensor, *, causal: bool, scale: float, sparse: bool,
              accumulate: bool, dq: Optional[torch.Tensor] = None, q_range: Optional[tuple[int, int]] = None) -> bool:
    """dK, dV of ``triton.attention_backward`` into its ``dk``/``dv`` (added in when ``accumulate``); ``delta``/
    ``lse2`` from ``prep``, ``dense``/``sp`` = (block, window, sink, stride) as the Triton driver builds them. False
    when the launch failed: the caller then runs the Triton kernel, and this path stays off with a warning.
    ``dq``: an fp32 [Tq, Hq, D] buffer (``dq_buffer_ok``) that each tile's share of dq is added into by TMA
    reduce-adds (5 matmuls per tile pair; without it dq is the Triton dq kernel's, 3 more). ``q_range`` = (lo, hi):
    only the q rows [lo, hi) of each document (multiples of 128; with ``accumulate``): a long sequence's chunks, so
    that the CTAs running together add into the same dq rows (L2); the KV tiles that see none of a chunk's rows
    return at once."""
    tq, hq, d = q.shape
    atomic = dq is not None
    if atomic and not dq_buffer_ok(dq):
        raise ValueError("dq: the buffer dq is added into must be fp32 [Tq, Hq, D] with adjacent heads and a "
                         "16-byte-aligned token stride (see dq_buffer_ok)")
    dq_flat = _flat(dq) if atomic else None
    hkv = k.shape[1]
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    lay_q = gl.NVMMASharedLayout.get_default_for([BLOCK_M, d], gdt)
    lay_k = gl.NVMMASharedLayout.get_default_for([BLOCK_N, d], gdt)
    lay_dq = gl.NVMMASharedLayout.get_default_for([BLOCK_M, d // 2], gl.float32)
    q_lo, q_lim = q_range or (0, 2 ** 31 - 1)
    if q_range is not None and (q_lo % BLOCK_N or (q_lim < max_k and q_lim % BLOCK_N) or not accumulate):
        raise ValueError(f"q_range {q_range}: multiples of {BLOCK_N}, and only with accumulate (dk/dv added in)")
    k_skip = q_lim if causal and q_range is not None else 2 ** 31 - 1
    grid = (triton.cdiv(max(min(max_k, k_skip), 1), BLOCK_N) * hkv, cu_q.numel() - 1)

    def launch():
        q_desc = TensorDescriptor.from_tensor(_flat(q), [BLOCK_M, d], lay_q)
        do_desc = TensorDescriptor.from_tensor(_flat(do), [BLOCK_M, d], lay_q)
        k_desc = TensorDescriptor.from_tensor(_flat(k), [BLOCK_N, d], lay_k)
        v_desc = TensorDescriptor.from_tensor(_flat(v), [BLOCK_N, d], lay_k)
        dq_desc = TensorDescriptor.from_tensor(dq_flat, [BLOCK_M, d // 2], lay_dq) if atomic else k_desc
        _attn_dkdv_sm90[grid](q_desc, k_desc, v_desc, do_desc, dq_desc, lse2, delta, dk, dv, cu_q, cu_k, dense,
                              scale * LOG2E, scale, lse2.stride(0), dk.stride(0), dk.stride(1), dv.stride(0),
                              dv.stride(1), *sp, hkv, q_lo, q_lim, k_skip, GROUP=hq // hkv, CAUSAL=causal,
                              SPARSE=sparse, ACC=accumulate, HEAD_DIM=d, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                              STAGES=STAGES_ATOMIC if atomic else STAGES,
                              PINGPONG=PINGPONG_FUSED if atomic else PINGPONG,
                              CONSUMER_REGS=CONSUMER_REGS, LOADER_REGS=LOADER_REGS,
                              WAIT_DV=WAIT_DV_FUSED if atomic else WAIT_DV,
                              ATOMIC_DQ=atomic, CHUNK=q_range is not None, DK_RS=DK_RS,
                              DQ_FIRST=DQ_FIRST if atomic else 0, LSE_SMEM=LSE_SMEM, num_warps=4)

    return launch_guarded(_BROKEN, "dk/dv kernel", launch)
