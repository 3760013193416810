"""The local block function every context-parallel strategy calls: attention of a query block over one
key/value block under a causal + document mask, returning ``(out, lse)``, and its flash-style backward.

Plain torch, fp64-capable: low-precision inputs are computed in fp32, fp64 stays fp64. This is the one place
a faster kernel (``longreach.kernels.flash``) is swapped in: keep the signature.

Masking is described per token, not per block, so the same function serves the zigzag ring, Ulysses and
packed documents: ``q_pos``/``k_pos`` are the tokens' indices in the (padded) global row and ``q_doc``/``k_doc``
their document ids. Key ``j`` is visible to query ``i`` iff ``doc[j] == doc[i]`` and (not causal or
``pos[j] <= pos[i]``). A query that sees no key gets ``out = 0`` and ``lse = -inf`` (the merge's identity).
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp64 stays fp64 (the exactness tests); everything else accumulates in fp32
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, q_doc: Optional[torch.Tensor],
               k_doc: Optional[torch.Tensor], causal: bool) -> Optional[torch.Tensor]:
    """Visibility mask bool [B or 1, Sq, Sk] (True = attend), or None when everything is visible.

    q_pos int64 [Sq] or [B, Sq]; k_pos [Sk] or [B, Sk]; q_doc/k_doc int64 [B, Sq]/[B, Sk] or None.
    """
    mask = None
    if causal:
        qp = q_pos if q_pos.dim() == 2 else q_pos[None]
        kp = k_pos if k_pos.dim() == 2 else k_pos[None]
        mask = kp[:, None, :] <= qp[:, :, None]
    if q_doc is not None:
        same = k_doc[:, None, :] == q_doc[:, :, None]
        mask = same if mask is None else mask & same
    return mask


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, mask: Optional[torch.Tensor]) -> torch.Tensor:
    # q [B, Sq, Hkv, G, D], k [B, Sk, Hkv, D] -> scores [B, Hkv, G, Sq, Sk]; GQA by broadcasting, never repeating KV
    s = torch.einsum("bqhgd,bkhd->bhgqk", q, k) * scale
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None], float("-inf"))
    return s


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
                    causal: bool, q_pos: torch.Tensor, k_pos: torch.Tensor,
                    q_doc: Optional[torch.Tensor] = None, k_doc: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of attention.

    q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] (Hq a multiple of Hkv) -> out [B, Sq, Hq, D] and lse [B, Hq, Sq], both in
    the compute dtype (fp64 for fp64 inputs, else fp32) so partial results merge without rounding.
    Positions and document ids as in the module docstring.
    """
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    ct = _compute_dtype(q.dtype)
    qg = q.to(ct).view(b, sq, hkv, g, d)
    s = _scores(qg, k.to(ct), scale, block_mask(q_pos, k_pos, q_doc, k_doc, causal))  # [B, Hkv, G, Sq, Sk]
    lse = torch.logsumexp(s, dim=-1)  # [B, Hkv, G, Sq]; -inf where a row sees nothing
    # exp(s - lse) with -inf rows pinned to 0 (exp(-inf - -inf) would be nan)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    out = torch.einsum("bhgqk,bkhd->bqhgd", p, v.to(ct)).reshape(b, sq, hq, d)
    return out, lse.reshape(b, hq, sq)


def local_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                             lse: torch.Tensor, dout: torch.Tensor, *, scale: Optional[float] = None, causal: bool,
                             q_pos: torch.Tensor, k_pos: torch.Tensor, q_doc: Optional[torch.Tensor] = None,
                             k_doc: Optional[torch.Tensor] = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the FINAL (merged) ``out`` and ``lse`` of the queries, flash-attention style:
    P is recomputed as exp(S - lse), D = rowsum(dout * out), dS = P * (dP - D).

    q/out/dout [B, Sq, Hq, D], k/v [B, Sk, Hkv, D], lse [B, Hq, Sq] -> dq [B, Sq, Hq, D], dk/dv [B, Sk, Hkv, D]
    in the compute dtype (callers accumulate them across blocks).
    """
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    ct = _compute_dtype(q.dtype)
    qg = q.to(ct).view(b, sq, hkv, g, d)
    kc, vc = k.to(ct), v.to(ct)
    dog = dout.to(ct).view(b, sq, hkv, g, d)
    lse_g = lse.to(ct).view(b, hkv, g, sq)
    s = _scores(qg, kc, scale, block_mask(q_pos, k_pos, q_doc, k_doc, causal))
    p = torch.exp(s - torch.where(torch.isinf(lse_g), torch.zeros_like(lse_g), lse_g)[..., None])
    p = torch.where(torch.isinf(lse_g)[..., None], torch.zeros_like(p), p)
    delta = (dog * out.to(ct).view(b, sq, hkv, g, d)).sum(-1).permute(0, 2, 3, 1)  # [B, Hkv, G, Sq]
    dv = torch.einsum("bhgqk,bqhgd->bkhd", p, dog)
    dp = torch.einsum("bqhgd,bkhd->bhgqk", dog, vc)
    ds = p * (dp - delta[..., None])
    dq = torch.einsum("bhgqk,bkhd->bqhgd", ds, kc).reshape(b, sq, hq, d) * scale
    dk = torch.einsum("bhgqk,bqhgd->bkhd", ds, qg) * scale
    return dq, dk, dv
