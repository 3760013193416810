"""The context-parallel attention op: Ulysses inside a sub-group x ring across sub-groups.

Pure ring (U = 1) skips the all-to-alls; pure Ulysses (R = 1) runs the "ring" with one slot, i.e. local
attention on the whole row with the zigzag sub-block skipping. One code path, so the three strategies cannot
drift apart.

Collectives per call, U > 1: forward 3 all-to-alls (q, stacked k/v, out), backward 3 (dout, dq, dk/dv);
plus the ring's (see ``ring.py``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .plan import CPAttnInfo
from .ring import ring_attention
from .ulysses import HeadsToSeq, SeqToHeads, check_heads, heads_to_seq_lse, replicate_kv_heads


def cp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, info: CPAttnInfo, causal: bool,
                 scale: Optional[float] = None, return_lse: bool = False):
    """Context-parallel softmax attention on this rank's shard.

    q [B, S_local, Hq, D], k/v [B, S_local, Hkv, D] laid out by the shard plan -> out [B, S_local, Hq, D]
    (and lse [B, Hq, S_local] fp32/fp64 if ``return_lse``; asking for it costs one extra all-to-all under Ulysses).
    """
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of key/value heads {hkv}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    u = info.ulysses_size
    expect = info.slot_pos.shape[1] // u
    if s != expect:
        raise ValueError(f"attention got {s} tokens per rank but the shard plan holds {expect}; shard inputs with "
                         "the same ShardPlan that built ctx.parallel")
    if u == 1:
        out, lse = ring_attention(q, k, v, info=info, causal=causal, scale=scale)
        return (out, lse) if return_lse else out
    check_heads(num_heads=hq, num_kv_heads=hkv, ulysses=u)
    k, v = replicate_kv_heads(k, ulysses=u), replicate_kv_heads(v, ulysses=u)
    qh = SeqToHeads.apply(q, info)  # [B, U*S, Hq/U, D]
    kvh = SeqToHeads.apply(torch.stack([k, v]), info)  # [2, B, U*S, Hkv'/U, D]: one all-to-all for K and V
    out, lse = ring_attention(qh, kvh[0], kvh[1], info=info, causal=causal, scale=scale)
    out = HeadsToSeq.apply(out, info)
    return (out, heads_to_seq_lse(lse, info)) if return_lse else out
