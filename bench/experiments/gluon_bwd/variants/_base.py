"""Shared part of the Gluon sm_90 attention backward experiments (``../README.md``): imports, tile constants, the
delta/lse2 prep kernel, the TMA reduce-add builtin and the host driver. ``../common.py`` splices one variant's
kernels (``<name>.py``) in at the KERNELS marker and loads the result as one module.

The arrangement (every variant): dk, dv AND dq in one pass over the (KV tile, q tile) pairs, 5 matmuls per pair
instead of the Triton backward's 7. Each program owns one KV tile (BLOCK_N keys of one KV head), keeps K, V, dK, dV
on chip, and walks the q tiles (BLOCK_M tokens of each q head of the GQA group) that see its keys:

    S^T = K Q^T,  P^T = exp2(S^T c - lse2),  dP^T = V dO^T,  dS^T = P^T (dP^T - delta)
    dV += P^T dO,  dK += dS^T Q,  dQ_tile = scale dS K  -> added into an fp32 dq by TMA reduce-add

Keys sit on the MMA rows (computed transposed), so P^T and dS^T feed dV/dK straight from registers; dS^T also goes
to shared memory once for dQ = dS K. Same contract as ``longreach.kernels.flash.triton.attention_backward`` (causal
or not, packed documents, GQA, the S2 block pattern, fp32 accumulate mode); needs Gluon (Triton >= 3.5), compute
capability 9.x, 16-bit operands and TMA-friendly strides (``supported()``).
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


# ---- KERNELS (the variant's file is spliced in here by ../common.py) ----


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
