"""Plain-torch masked dense attention with lse, forward and explicit backward (the kernels' specification).

Computes in the inputs' dtype (pass fp32/fp64 for a reference). Layout as the kernels: q [Tq, Hq, D],
k/v [Tk, Hkv, D], documents paired by ``cu_q``/``cu_k`` (int [n_docs+1]); causal is top-left aligned inside each
document pair (key j visible to query i iff j <= i). ``allowed(doc, sq, sk)`` may add a mask: bool
broadcastable to [Hkv, sq, sk] (used by the S2 reference). A row that sees no key gets out 0, lse -inf.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

MaskFn = Callable[[int, int, int], torch.Tensor]


def _doc_mask(sq: int, sk: int, causal: bool, hkv: int, group: int, allowed: Optional[MaskFn], doc: int,
              device) -> torch.Tensor:
    """bool [Hq or 1, sq, sk]: which keys each query sees."""
    mask = torch.ones(1, sq, sk, dtype=torch.bool, device=device)
    if causal:
        mask = mask & torch.ones(sq, sk, dtype=torch.bool, device=device).tril()[None]
    if allowed is not None:
        extra = allowed(doc, sq, sk).to(device)  # [Hkv or 1, sq, sk]
        mask = mask & extra.repeat_interleave(group, 0) if extra.shape[0] == hkv else mask & extra
    return mask


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, *,
                        causal: bool, scale: float, allowed: Optional[MaskFn] = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> out [Tq, Hq, D] (q's dtype), lse [Hq, Tq] (q's dtype). Differentiable by autograd."""
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    cq, ck = cu_q.tolist(), cu_k.tolist()
    outs, lses = [], []
    for doc in range(len(cq) - 1):
        qd = q[cq[doc]:cq[doc + 1]].transpose(0, 1)  # [Hq, sq, D]
        kd = k[ck[doc]:ck[doc + 1]].transpose(0, 1).repeat_interleave(group, 0)  # [Hq, sk, D]
        vd = v[ck[doc]:ck[doc + 1]].transpose(0, 1).repeat_interleave(group, 0)
        sq, sk = qd.shape[1], kd.shape[1]
        s = (qd @ kd.transpose(1, 2)) * scale
        mask = _doc_mask(sq, sk, causal, hkv, group, allowed, doc, q.device)
        s = s.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s, dim=-1) if sk > 0 else s.new_full((hq, sq), float("-inf"))  # [Hq, sq]
        seen = torch.isfinite(lse)
        p = torch.exp(s - torch.where(seen, lse, torch.zeros_like(lse))[..., None])
        p = torch.where(seen[..., None], p, torch.zeros_like(p))
        outs.append((p @ vd).transpose(0, 1))
        lses.append(lse)
    return torch.cat(outs, 0), torch.cat(lses, 1)


def attention_backward_reference(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 out: torch.Tensor, lse: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, *,
                                 causal: bool, scale: float, allowed: Optional[MaskFn] = None
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Explicit backward given the (possibly merged, ring-global) out [Tq, Hq, D] and lse [Hq, Tq]:
    P = exp(S - lse), dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K scale, dK = dS^T Q scale."""
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    cq, ck = cu_q.tolist(), cu_k.tolist()
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    delta = (do * out).sum(-1).transpose(0, 1)  # [Hq, Tq]
    for doc in range(len(cq) - 1):
        a, b, c, e = cq[doc], cq[doc + 1], ck[doc], ck[doc + 1]
        qd, dod = q[a:b].transpose(0, 1), do[a:b].transpose(0, 1)  # [Hq, sq, D]
        kd = k[c:e].transpose(0, 1).repeat_interleave(group, 0)
        vd = v[c:e].transpose(0, 1).repeat_interleave(group, 0)
        sq, sk = qd.shape[1], kd.shape[1]
        if sq == 0 or sk == 0:
            continue
        s = (qd @ kd.transpose(1, 2)) * scale
        mask = _doc_mask(sq, sk, causal, hkv, group, allowed, doc, q.device)
        ld = lse[:, a:b]
        ld = torch.where(torch.isfinite(ld), ld, torch.full_like(ld, float("inf")))
        p = torch.exp(s - ld[..., None]).masked_fill(~mask, 0.0)
        dvd = p.transpose(1, 2) @ dod  # [Hq, sk, D]
        ds = p * (dod @ vd.transpose(1, 2) - delta[:, a:b, None])
        dq[a:b] = ((ds @ kd) * scale).transpose(0, 1)
        dkd = (ds.transpose(1, 2) @ qd) * scale
        dk[c:e] = dkd.view(hkv, group, sk, -1).sum(1).transpose(0, 1)
        dv[c:e] = dvd.view(hkv, group, sk, -1).sum(1).transpose(0, 1)
    return dq, dk, dv
