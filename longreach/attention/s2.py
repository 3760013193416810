"""``s2``: sparse-sharded (S2-Attention / LongGen) causal attention through our Triton kernel.

Options (from the layer's ``AttnSpec.options``): block, window, sink, stride (see kernels/s2/pattern.py),
dense_heads (kv heads that attend densely) and dense (the whole layer dense: a LongGen hybrid's full layers).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..kernels.s2 import s2_attention
from .context import AttnContext
from .registry import register


@register("s2")
def s2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ctx: AttnContext, block: int = 128,
       window: int = 2048, sink: int = 128, stride: int = 8, dense_heads: Sequence[int] = (),
       dense: bool = False) -> torch.Tensor:
    """q [B, S, Hq, D], k/v [B, S, Hkv, D] -> out [B, S, Hq, D]; packed documents via ``ctx.cu_seqlens``."""
    if ctx.parallel is not None:
        raise ValueError("attention 's2' runs on one rank only but the batch is context-parallel; set parallel.cp=1")
    if not ctx.causal:
        raise ValueError("attention 's2' is causal only; use attention 'flash' for a non-causal layer")
    return s2_attention(q, k, v, block=block, window=window, sink=sink, stride=stride, dense_heads=dense_heads,
                        dense=dense, scale=ctx.scale, cu_seqlens=ctx.cu_seqlens, max_seqlen=ctx.max_seqlen,
                        return_lse=False)
