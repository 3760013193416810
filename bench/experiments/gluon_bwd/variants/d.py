"""Hopper (sm_90) attention backward in Gluon: dk, dv AND dq in one pass over the (KV tile, q tile) pairs.

The Triton backward (``triton.py``) runs dk/dv per KV tile and dq per q tile: 7 matmuls per tile pair (S and dP
are computed twice). This kernel is the FlashAttention-2/3 arrangement, 5 matmuls per pair: each program owns one
KV tile (BLOCK_N keys of one KV head), keeps K, V, dK, dV on chip, and walks the q tiles (BLOCK_M tokens of each q
head of the GQA group) that see its keys:

    S^T = K Q^T,  P^T = exp2(S^T c - lse2),  dP^T = V dO^T,  dS^T = P^T (dP^T - delta)
    dV += P^T dO,  dK += dS^T Q,  dQ_tile = scale dS K  -> added into an fp32 dq by TMA reduce-add

What plain Triton could not do (``bench/experiments/flash_tma``): issue the dq reduce-add asynchronously and wait
for it only when its shared-memory buffer comes round again, keep S^T and dP^T in flight together, and prefetch the
next q/dout tiles by TMA into a ring of buffers under mbarriers. Keys sit on the MMA rows (computed transposed), so
P^T and dS^T feed dV/dK straight from registers; dS^T also goes to shared memory once for dQ = dS K.

Same contract as ``triton.attention_backward`` (causal or not, packed documents, GQA, the S2 block pattern, fp32
accumulate mode for the ring). It needs Gluon (Triton >= 3.5), a GPU of compute capability 9.x, 16-bit operands
and TMA-friendly strides; ``supported()`` says whether a call qualifies and the caller falls back to the Triton
kernels otherwise (the CPU/interpreter path is always the Triton one).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

try:
    from triton._C.libtriton import ir as _ir
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language._core import builtin as _builtin
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    HAVE_GLUON = True
except ImportError:  # pragma: no cover - older Triton
    HAVE_GLUON = False

LOG2E = 1.4426950408889634

# tiles (H200, D=128): BLOCK_N keys per program, BLOCK_M q tokens per step, q/dout buffers, warps (2 warpgroups)
BLOCK_N = 128
BLOCK_M = 64
STAGES = 2
DQ_BUFS = 2
WARPS = 8
ABLATE = 0  # experiments: 1 = no dq reduce-add, 2 = no dq epilogue (timings only)


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


if HAVE_GLUON:

    @_builtin
    def _tma_reduce_add(desc, coord, src, _semantic=None):
        """global[box at coord] += shared ``src`` (cp.reduce.async.bulk.tensor .add); completes like a TMA store
        (``tma.store_wait``)."""
        coord = _semantic._convert_to_ir_values(coord, require_i64=False)
        _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD, desc.handle, coord, src.handle)

    @gluon.jit
    def _issue(q_desc, do_desc, bars, q_bufs, do_bufs, it, n_total, n_per, lo, q_start, head_base,
               HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
        # TMA loads of q and dout for flat step ``it`` (q head head_base + it // n_per, tokens lo + (it % n_per) *
        # BLOCK_M ...) into buffer it % STAGES; nothing past the last step
        ok = it < n_total
        s = it % STAGES
        g = it // gl.maximum(n_per, 1)
        row = q_start + lo + (it - g * n_per) * BLOCK_M
        col = (head_base + g) * HEAD_DIM
        bar = bars.index(s)
        mbarrier.expect(bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes, pred=ok)
        tma.async_copy_global_to_shared(q_desc, [row, col], bar, q_bufs.index(s), pred=ok)
        tma.async_copy_global_to_shared(do_desc, [row, col], bar, do_bufs.index(s), pred=ok)

    @gluon.jit
    def _attn_bwd_sm90(q_desc, k_desc, v_desc, do_desc, dq_desc, LSE2, DELTA, DK, DV, CU_Q, CU_K, DENSE,
                       qk_scale, sm_scale, stride_lh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                       sp_block, sp_window, sp_sink, sp_stride, N_KV,
                       GROUP: gl.constexpr, CAUSAL: gl.constexpr, SPARSE: gl.constexpr, ACC: gl.constexpr,
                       HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                       STAGES: gl.constexpr, DQ_BUFS: gl.constexpr, ABLATE: gl.constexpr, num_warps: gl.constexpr):
        # layouts: S^T/dP^T [BLOCK_N, BLOCK_M] and dK/dV [BLOCK_N, D] over 2 warpgroups along the keys; dQ
        # [BLOCK_M, D] over the warpgroups along D
        s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        kv_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
        dq_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, num_warps // 4],
                                                       instr_shape=[16, HEAD_DIM // (num_warps // 4), 16])
        a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_l, k_width=2)
        col_l: gl.constexpr = gl.SliceLayout(0, s_l)  # per q row (S^T columns)
        row_l: gl.constexpr = gl.SliceLayout(1, s_l)  # per key (S^T rows)
        ds_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], gl.bfloat16)

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
            ds_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M], ds_sl)
            dq_bufs = gl.allocate_shared_memory(gl.float32, [DQ_BUFS, BLOCK_M, HEAD_DIM], dq_desc.layout)
            kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
            bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            mbarrier.init(kv_bar, count=1)
            for i in gl.static_range(STAGES):
                mbarrier.init(bars.index(i), count=1)

            # the q range that sees this KV tile: causal from its first key; S2: the window's q blocks, or all
            # later ones for a sink / on-shard key block
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
            kv_partial = j0 + BLOCK_N > k_len

            mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [k_start + j0, hkv * HEAD_DIM], kv_bar, k_smem)
            tma.async_copy_global_to_shared(v_desc, [k_start + j0, hkv * HEAD_DIM], kv_bar, v_smem)
            for i in gl.static_range(STAGES):
                _issue(q_desc, do_desc, bars, q_bufs, do_bufs, i, n_total, n_per, lo, q_start, head_base,
                       HEAD_DIM, BLOCK_M, STAGES)

            dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_l)
            dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_l)
            cols = j0 + gl.arange(0, BLOCK_N, layout=row_l)  # key index in the document
            offs_m = gl.arange(0, BLOCK_M, layout=col_l)
            mbarrier.wait(kv_bar, 0)
            # step 0's S^T and dP^T in flight before the loop; each step issues the next one's before its dq
            # epilogue, so the tensor cores stay busy while dq goes to shared memory and out
            for it in range(n_total):
                st = it % STAGES
                g = it // n_per
                start = lo + (it - g * n_per) * BLOCK_M
                head = head_base + g
                tok = start + offs_m
                row_ok = tok < q_len
                lse = gl.load(LSE2 + head * stride_lh + q_start + tok, mask=row_ok, other=float("inf"))
                q_s = q_bufs.index(st)
                do_s = do_bufs.index(st)
                mbarrier.wait(bars.index(st), (it // STAGES) & 1)
                s_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_l)
                sT = warpgroup_mma(k_smem, q_s.permute((1, 0)), s_zero, use_acc=False, is_async=True)
                dpT = warpgroup_mma(v_smem, do_s.permute((1, 0)), s_zero, use_acc=False, is_async=True)
                sT = warpgroup_mma_wait(num_outstanding=1, deps=(sT, ))
                pT = gl.exp2(sT * qk_scale - gl.expand_dims(lse, 0))
                masked = kv_partial | (start + BLOCK_M > q_len)
                if CAUSAL:
                    masked = masked | (start < j0 + BLOCK_N)
                if masked:
                    ok = gl.expand_dims(cols < k_len, 1) & gl.expand_dims(row_ok, 0)
                    if CAUSAL:
                        ok = ok & (gl.expand_dims(cols, 1) <= gl.expand_dims(tok, 0))
                    pT = gl.where(ok, pT, 0.0)
                p16 = gl.convert_layout(pT.to(dtype), a_l)
                dv = warpgroup_mma(p16, do_s, dv, is_async=True)
                delta = gl.load(DELTA + head * stride_lh + q_start + tok, mask=row_ok, other=0.0)
                dpT = warpgroup_mma_wait(num_outstanding=1, deps=(dpT, ))
                dsT = (pT * (dpT - gl.expand_dims(delta, 0))).to(dtype)
                if ABLATE < 3:
                    ds_smem.store(dsT)
                    fence_async_shared()
                dk = warpgroup_mma(gl.convert_layout(dsT, a_l), q_s, dk, is_async=True)
                dq_zero = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, dq_l)
                if ABLATE < 3:
                    dq = warpgroup_mma(ds_smem.permute((1, 0)), k_smem, dq_zero, use_acc=False, is_async=True)
                else:
                    dq = dq_zero
                dq, dk, dv = warpgroup_mma_wait(num_outstanding=0, deps=(dq, dk, dv))
                # buffer st is free: the step STAGES ahead loads into it
                _issue(q_desc, do_desc, bars, q_bufs, do_bufs, it + STAGES, n_total, n_per, lo, q_start,
                       head_base, HEAD_DIM, BLOCK_M, STAGES)
                if ABLATE < 2:
                    tma.store_wait(pendings=DQ_BUFS - 1)  # the reduce that last read this dq buffer is done
                    dq_s = dq_bufs.index(it % DQ_BUFS)
                    dq_s.store(dq * sm_scale)
                    fence_async_shared()
                    if ABLATE < 1:
                        _tma_reduce_add(dq_desc, [q_start + start, head * HEAD_DIM], dq_s)
            tma.store_wait(pendings=0)
            mbarrier.invalidate(kv_bar)
            for i in gl.static_range(STAGES):
                mbarrier.invalidate(bars.index(i))

            dk = dk * sm_scale
            o_l: gl.constexpr = gl.SliceLayout(1, kv_l)
            d_l: gl.constexpr = gl.SliceLayout(0, kv_l)
            ck = j0 + gl.arange(0, BLOCK_N, layout=o_l)
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


def _flat(x: torch.Tensor) -> Optional[torch.Tensor]:
    """[T, H, D] -> [T, H*D] view (rows of heads back to back), or None when the heads are not adjacent."""
    t, h, d = x.shape
    if x.stride(2) != 1 or (h > 1 and x.stride(1) != d):
        return None
    return x.as_strided((t, h * d), (x.stride(0), 1))


def _tma_ok(x: torch.Tensor) -> bool:
    return x.data_ptr() % 16 == 0 and (x.stride(0) * x.element_size()) % 16 == 0


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor,
              sparse_block: Optional[int]) -> bool:
    """Whether this kernel can run the call: Gluon present, sm_90, bf16/fp16, head dim 64 or 128, heads adjacent and
    TMA-aligned, and (S2) a sparse block that is a multiple of BLOCK_N."""
    if not HAVE_GLUON or not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    if q.shape[-1] not in (64, 128) or any(x.dtype != q.dtype for x in (k, v, do)):
        return False
    if sparse_block is not None and sparse_block % BLOCK_N:
        return False
    flats = [_flat(x) for x in (q, k, v, do)]
    return all(f is not None and _tma_ok(f) for f in flats)


def attention_backward(do, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, *, causal: bool, scale: float,
                       dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, accumulate: bool,
                       sparse=None, dense_heads: Optional[torch.Tensor] = None, sp: tuple = (128, 1, 0, 1)):
    """Fills dk/dv (stored, or added into when ``accumulate``) and dq (fp32 sum; see the caller) for the shapes of
    ``triton.attention_backward``. ``dq``: fp32 [Tq, Hq, D] with adjacent heads, zeroed (or the running sum when
    ``accumulate``); the kernel adds scale * dS K into it."""
    tq, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    tpad = (tq + 3) // 4 * 4  # fp32 rows of lse2/delta 16-byte aligned
    delta = torch.empty((hq, tpad), dtype=torch.float32, device=q.device)
    lse2 = torch.empty((hq, tpad), dtype=torch.float32, device=q.device)
    blk = 64
    _prep[(triton.cdiv(tq, blk), hq)](out, do, lse, delta, lse2, tq, out.stride(0), out.stride(1), do.stride(0),
                                      do.stride(1), lse.stride(0), delta.stride(0), HEAD_DIM=d, BLOCK=blk)
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    lay_q = gl.NVMMASharedLayout.get_default_for([BLOCK_M, d], gdt)
    lay_k = gl.NVMMASharedLayout.get_default_for([BLOCK_N, d], gdt)
    lay_dq = gl.NVMMASharedLayout.get_default_for([BLOCK_M, d], gl.float32)
    fq, fk, fv, fdo, fdq = (_flat(x) for x in (q, k, v, do, dq))
    q_desc = TensorDescriptor.from_tensor(fq, [BLOCK_M, d], lay_q)
    do_desc = TensorDescriptor.from_tensor(fdo, [BLOCK_M, d], lay_q)
    k_desc = TensorDescriptor.from_tensor(fk, [BLOCK_N, d], lay_k)
    v_desc = TensorDescriptor.from_tensor(fv, [BLOCK_N, d], lay_k)
    dq_desc = TensorDescriptor.from_tensor(fdq, [BLOCK_M, d], lay_dq)
    if dense_heads is None:
        dense_heads = torch.zeros(1, dtype=torch.int32, device=q.device)
    n_docs = cu_q.numel() - 1
    grid = (triton.cdiv(max(max_k, 1), BLOCK_N) * hkv, n_docs)
    _attn_bwd_sm90[grid](q_desc, k_desc, v_desc, do_desc, dq_desc, lse2, delta, dk, dv, cu_q, cu_k, dense_heads,
                         scale * LOG2E, scale, lse2.stride(0), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
                         *sp, hkv, GROUP=group, CAUSAL=causal, SPARSE=sparse is not None, ACC=accumulate,
                         HEAD_DIM=d, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, STAGES=STAGES, DQ_BUFS=DQ_BUFS, ABLATE=ABLATE, num_warps=WARPS)
