"""Plain-torch S2 attention: the masked dense reference (flash reference with the S2 token mask)."""

from __future__ import annotations

import torch

from ..flash.reference import attention_reference
from .pattern import S2Pattern


def s2_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, *, pattern: S2Pattern,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k/v [T, Hkv, D], cu int [n_docs+1] -> out [T, Hq, D], lse [Hq, T] (inputs' dtype, autograd)."""
    hkv = k.shape[1]

    def allowed(doc: int, sq: int, sk: int) -> torch.Tensor:
        return pattern.token_mask(sq, hkv, device=q.device)  # blocks counted from each document's start

    return attention_reference(q, k, v, cu, cu, causal=True, scale=scale, allowed=allowed)
