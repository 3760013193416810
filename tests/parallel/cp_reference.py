"""Independent single-process references for the CP tests: dense masked softmax attention (autograd, any dtype)
and random packed batches. Deliberately written differently from longreach.parallel.local (repeat KV, full mask)."""

from __future__ import annotations

import math
from typing import Optional

import torch


def doc_ids_from_cu(cu: Optional[torch.Tensor], b: int, s: int) -> Optional[torch.Tensor]:
    if cu is None:
        return None
    lengths = (cu[1:] - cu[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lengths)), lengths).view(b, s)


def dense_reference(q, k, v, *, causal: bool, cu_seqlens: Optional[torch.Tensor] = None, scale=None):
    """q [B, S, Hq, D], k/v [B, S, Hkv, D] -> out [B, S, Hq, D], lse [B, Hq, S] (same dtype as q)."""
    b, s, hq, d = q.shape
    g = hq // k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kr, vr = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kr) * scale
    allowed = torch.ones(s, s, dtype=torch.bool).expand(b, s, s)
    if causal:
        allowed = allowed & torch.ones(s, s, dtype=torch.bool).tril()
    docs = doc_ids_from_cu(cu_seqlens, b, s)
    if docs is not None:
        allowed = allowed & (docs[:, :, None] == docs[:, None, :])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, vr), lse


def random_cu_seqlens(b: int, s: int, gen: torch.Generator, max_docs: int = 4) -> torch.Tensor:
    """Packed rows of random odd/even document lengths; every row starts a document."""
    cuts = [0]
    for row in range(b):
        n = int(torch.randint(1, max_docs + 1, (1,), generator=gen))
        inner = sorted(set(torch.randint(1, s, (n - 1,), generator=gen).tolist())) if n > 1 else []
        cuts += [row * s + c for c in inner] + [(row + 1) * s]
    return torch.tensor(cuts, dtype=torch.int32)
