"""``flash``: causal/non-causal softmax attention through our Triton kernel (reference path on CPU)."""

from __future__ import annotations

import torch

from ..kernels.flash import flash_attention
from .context import AttnContext
from .registry import register


@register("flash")
def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ctx: AttnContext) -> torch.Tensor:
    """q [B, S, Hq, D], k/v [B, S, Hkv, D] -> out [B, S, Hq, D]; packed documents via ``ctx.cu_seqlens``."""
    if ctx.parallel is not None:
        raise ValueError("attention 'flash' runs on one rank only but the batch is context-parallel; "
                         "use model.attention='ring', 'ulysses' or 'hybrid' (or set parallel.cp=1)")
    return flash_attention(q, k, v, causal=ctx.causal, scale=ctx.scale, cu_seqlens=ctx.cu_seqlens,
                           max_seqlen=ctx.max_seqlen, return_lse=False)
