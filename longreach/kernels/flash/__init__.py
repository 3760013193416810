"""Flash attention with lse out: Triton kernels on GPU (or under TRITON_INTERPRET=1), plain torch elsewhere.

Public API
----------
``flash_attention(q, k, v, *, causal=True, scale=None, cu_seqlens=None, max_seqlen=None, return_lse=True)``
    q [B, S, Hq, D], k/v [B, S, Hkv, D] (GQA: Hq a multiple of Hkv, KV never repeated), or packed
    q [T, Hq, D], k/v [T, Hkv, D] with ``cu_seqlens`` (int32 [n_docs+1]; with 4-D inputs it runs over the
    flattened B*S tokens, as ``AttnContext.cu_seqlens``). bf16/fp16 (fp32 accepted: tf32 dots), head dim a power
    of two in [16, 128] (tuned for 64 and 128). fp32 accumulation. Returns (out like q, lse fp32 [B, Hq, S] or
    [Hq, T], natural log); ``return_lse=False`` returns out only. Differentiable in q, k, v (lse is not).

Block API for ring attention (fp32 out so partial results merge without a bf16 round trip)
------------------------------------------------------------------------------------------
``flash_attention_block(q, k, v, *, mask="causal"|"full", cu_seqlens_q=None, cu_seqlens_k=None,
max_seqlen_q=None, max_seqlen_k=None, scale=None) -> (out fp32, lse fp32)``
    One (q chunk, kv chunk) step. q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D]; or packed [Tq, Hq, D] / [Tk, Hkv, D] with
    ``cu_seqlens_q``/``cu_seqlens_k`` of equal length: document i of q attends document i of k (an empty segment,
    length 0, is fine). This is how packed documents cross ring shards: clamp the global document boundaries to
    each shard, ``cu_q = (cu_global - q_shard_start).clamp(0, L)``, ``cu_k`` likewise for the kv shard.
    ``mask="causal"``: the diagonal step, top-left aligned per document pair (key j visible to query i iff j <= i);
    ``mask="full"``: the kv chunk lies entirely before the q chunk. out [like q] fp32, lse fp32 [B, Hq, Sq] or
    [Hq, Tq]; a row that sees no key gets out 0, lse -inf (neutral in the merge).
``flash_attention_block_backward(dout, q, k, v, out, lse, *, mask, cu_seqlens_q=None, cu_seqlens_k=None,
max_seqlen_q=None, max_seqlen_k=None, scale=None) -> (dq, dk, dv) fp32``
    Pass the FINAL merged out and lse of the rows (not this step's): P = exp(S - lse) is then this step's slice of
    the global softmax, and dq/dk/dv are this step's contributions, in fp32 so the ring sums them across hops.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from . import reference

_MAX_HEAD_DIM = 128


def triton_enabled(x: torch.Tensor) -> bool:
    """True when the Triton kernels run for tensors like ``x``: CUDA, or CPU under TRITON_INTERPRET=1."""
    if x.is_cuda:
        return True
    return x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kernel: bool, name: str = "flash_attention"):
    """Shape/dtype checks shared by the public functions; errors name the argument and the fix."""
    if q.dim() not in (3, 4) or k.dim() != q.dim() or v.shape != k.shape:
        raise ValueError(f"{name}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be [B, S, H, D] "
                         "or packed [T, H, D], with k and v of one shape")
    hq, d = q.shape[-2], q.shape[-1]
    hkv = k.shape[-2]
    if k.shape[-1] != d:
        raise ValueError(f"{name}: q head dim {d} != k head dim {k.shape[-1]}")
    if hq % hkv:
        raise ValueError(f"{name}: query heads {hq} must be a multiple of key/value heads {hkv}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{name}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype")
    if kernel:
        if d not in (16, 32, 64, 128):
            raise ValueError(f"{name}: head dim {d} is not supported by the Triton kernel (supported: 16, 32, 64, "
                             f"128; tuned for 64 and 128); use attention 'dense' for this model")
        if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"{name}: dtype {q.dtype} unsupported; use bfloat16 or float16")


def to_packed(x: torch.Tensor) -> torch.Tensor:
    """[B, S, H, D] -> [B*S, H, D] (a view when possible); packed input unchanged; last dim made contiguous."""
    x = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() == 4 else x
    return x if x.stride(-1) == 1 else x.contiguous()


def doc_bounds(x: torch.Tensor, cu_seqlens: Optional[torch.Tensor], max_seqlen: Optional[int], arg: str
               ) -> tuple[torch.Tensor, int]:
    """(cu int32 on x's device, longest document) for [B, S, H, D] or packed x."""
    if cu_seqlens is None:
        if x.dim() != 4:
            raise ValueError(f"packed 3-D inputs need {arg}: pass int32 [n_docs+1] document boundaries")
        b, s = x.shape[:2]
        return torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=x.device), s
    total = x.shape[0] * x.shape[1] if x.dim() == 4 else x.shape[0]
    cu = cu_seqlens.to(device=x.device, dtype=torch.int32)
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{arg} must be 1-D int32 [n_docs+1], got shape {tuple(cu.shape)}")
    if max_seqlen is None:
        ends = cu.tolist()
        if ends[-1] != total:
            raise ValueError(f"{arg} ends at {ends[-1]} but the input has {total} tokens; build it over all tokens")
        max_seqlen = max([e - a for a, e in zip(ends[:-1], ends[1:])] + [0])
    return cu, int(max_seqlen)


def lse_to_user(lse: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Kernel lse [Hq, T] -> [B, Hq, S] for 4-D inputs (packed inputs keep [Hq, T])."""
    if like.dim() == 4:
        b, s = like.shape[:2]
        return lse.view(lse.shape[0], b, s).transpose(0, 1)
    return lse


def lse_from_user(lse: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B, Hq, S] or [Hq, T] -> contiguous fp32 [Hq, T]."""
    if like.dim() == 4:
        lse = lse.transpose(0, 1).reshape(lse.shape[1], -1)
    return lse.float().contiguous()


class _KernelAttention(torch.autograd.Function):
    """Autograd around the Triton forward/backward (packed layout)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, sparse, pack):
        from . import triton as tk

        out, lse = tk.attention_forward(q, k, v, cu_q, cu_k, max_q, causal=causal, scale=scale, out_dtype=q.dtype,
                                        sparse=sparse, pack=pack)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, causal, scale, sparse, pack)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        from . import triton as tk

        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, causal, scale, sparse, pack = ctx.args
        dq, dk, dv = tk.attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal=causal,
                                           scale=scale, sparse=sparse, pack=pack)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def run_attention(q, k, v, *, causal: bool, scale: Optional[float], cu_seqlens, max_seqlen, sparse=None, pack=1,
                  allowed=None, name="flash_attention"):
    """Shared driver of flash_attention and s2_attention: (out like q, lse fp32 user layout)."""
    kernel = triton_enabled(q)
    check_inputs(q, k, v, kernel=kernel, name=name)
    if q.shape[:-2] != k.shape[:-2]:
        raise ValueError(f"{name}: q {tuple(q.shape)} and k {tuple(k.shape)} must have the same tokens "
                         "(use flash_attention_block for different q/kv chunks)")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    cu, max_len = doc_bounds(q, cu_seqlens, max_seqlen, "cu_seqlens")
    q3, k3, v3 = to_packed(q), to_packed(k), to_packed(v)
    if kernel:
        sp = sparse(k3.shape[1], q.device) if callable(sparse) else sparse
        out, lse = _KernelAttention.apply(q3, k3, v3, cu, cu, max_len, max_len, causal, scale, sp, pack)
    else:
        # CPU without the interpreter: the fp32 reference (autograd through it)
        out, lse = reference.attention_reference(q3.float(), k3.float(), v3.float(), cu, cu, causal=causal,
                                                 scale=scale, allowed=allowed)
        out, lse = out.to(q.dtype), lse.detach().float()
    return out.reshape(q.shape), lse_to_user(lse, q)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None,
                    max_seqlen: Optional[int] = None, return_lse: bool = True):
    """Softmax attention; see the module docstring for shapes. -> (out, lse) or out."""
    out, lse = run_attention(q, k, v, causal=causal, scale=scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    return (out, lse) if return_lse else out


def _block_args(q, k, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, name):
    if mask not in ("causal", "full"):
        raise ValueError(f"{name}: mask={mask!r}; use 'causal' (diagonal step) or 'full' (kv chunk before q chunk)")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError(f"{name}: pass both cu_seqlens_q and cu_seqlens_k, or neither")
    if q.dim() == 4 and q.shape[0] != k.shape[0]:
        raise ValueError(f"{name}: q batch {q.shape[0]} != k batch {k.shape[0]}")
    cu_q, mq = doc_bounds(q, cu_seqlens_q, max_seqlen_q, "cu_seqlens_q")
    cu_k, mk = doc_bounds(k, cu_seqlens_k, max_seqlen_k, "cu_seqlens_k")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"{name}: cu_seqlens_q has {cu_q.numel()} entries and cu_seqlens_k {cu_k.numel()}; "
                         "document i of q pairs with document i of k, so give both the same document count")
    return cu_q, cu_k, mq, mk


def flash_attention_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: str = "causal",
                          cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
                          max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
                          scale: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One ring step: (out fp32 like q, lse fp32). See the module docstring. Not differentiable: use
    ``flash_attention_block_backward``."""
    name = "flash_attention_block"
    kernel = triton_enabled(q)
    check_inputs(q, k, v, kernel=kernel, name=name)
    cu_q, cu_k, mq, mk = _block_args(q, k, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, name)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q3, k3, v3 = to_packed(q), to_packed(k), to_packed(v)
    causal = mask == "causal"
    with torch.no_grad():
        if kernel:
            from . import triton as tk

            out, lse = tk.attention_forward(q3, k3, v3, cu_q, cu_k, mq, causal=causal, scale=scale,
                                            out_dtype=torch.float32)
        else:
            out, lse = reference.attention_reference(q3.float(), k3.float(), v3.float(), cu_q, cu_k, causal=causal,
                                                     scale=scale)
    return out.reshape(q.shape), lse_to_user(lse.float(), q)


def flash_attention_block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   out: torch.Tensor, lse: torch.Tensor, *, mask: str = "causal",
                                   cu_seqlens_q: Optional[torch.Tensor] = None,
                                   cu_seqlens_k: Optional[torch.Tensor] = None, max_seqlen_q: Optional[int] = None,
                                   max_seqlen_k: Optional[int] = None, scale: Optional[float] = None
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ring step's gradients (dq like q, dk/dv like k; fp32) given dout and the FINAL merged out/lse."""
    name = "flash_attention_block_backward"
    kernel = triton_enabled(q)
    check_inputs(q, k, v, kernel=kernel, name=name)
    cu_q, cu_k, mq, mk = _block_args(q, k, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, name)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q3, k3, v3, o3, do3 = (to_packed(x) for x in (q, k, v, out, dout))
    lse3 = lse_from_user(lse, q)
    causal = mask == "causal"
    with torch.no_grad():
        if kernel:
            from . import triton as tk

            dq, dk, dv = tk.attention_backward(do3, q3, k3, v3, o3, lse3, cu_q, cu_k, mq, mk, causal=causal,
                                               scale=scale, grad_dtype=torch.float32)
        else:
            dq, dk, dv = reference.attention_backward_reference(do3.float(), q3.float(), k3.float(), v3.float(),
                                                                o3.float(), lse3, cu_q, cu_k, causal=causal,
                                                                scale=scale)
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)


__all__ = ["flash_attention", "flash_attention_block", "flash_attention_block_backward", "triton_enabled"]
