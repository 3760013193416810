"""Sparse-sharded (S2-Attention / LongGen) attention: Triton on GPU (or under TRITON_INTERPRET=1), torch elsewhere.

``s2_attention(q, k, v, *, block=128, window=2048, sink=128, stride=8, dense_heads=(), dense=False, scale=None,
cu_seqlens=None, max_seqlen=None, return_lse=True)``
    Causal. Shapes as ``flash_attention``: q [B, S, Hq, D], k/v [B, S, Hkv, D] or packed [T, H, D] with
    ``cu_seqlens``; the pattern (see ``pattern.py``) restarts at every document. ``dense=True`` makes it plain
    causal flash attention (a dense layer); ``dense_heads`` lists kv heads that attend densely.
    Returns (out like q, lse fp32 [B, Hq, S] or [Hq, T]) or out; differentiable in q, k, v.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..flash import flash_attention, run_attention
from .pattern import S2Pattern, as_pattern
from .reference import s2_reference


def s2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block: int = 128, window: int = 2048,
                 sink: int = 128, stride: int = 8, dense_heads: Sequence[int] = (), dense: bool = False,
                 scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None,
                 max_seqlen: Optional[int] = None, return_lse: bool = True):
    """S2 attention; see the module docstring."""
    if dense:
        return flash_attention(q, k, v, causal=True, scale=scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                               return_lse=return_lse)
    hkv = k.shape[-2]
    pattern = as_pattern(block, window, sink, stride, dense_heads).validate(hkv)
    group = q.shape[-2] // hkv if hkv and q.shape[-2] % hkv == 0 else 1

    def allowed(doc: int, sq: int, sk: int) -> torch.Tensor:
        return pattern.token_mask(sq, hkv, device=q.device)

    def sparse(n: int, dev: torch.device):  # only on the kernel path: Triton is imported there, not here
        from .triton import sparse_args

        return sparse_args(pattern, n, dev)

    out, lse = run_attention(q, k, v, causal=True, scale=scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                             sparse=sparse, pack=group, allowed=allowed,
                             name="s2_attention")
    return (out, lse) if return_lse else out


__all__ = ["s2_attention", "S2Pattern", "s2_reference"]
