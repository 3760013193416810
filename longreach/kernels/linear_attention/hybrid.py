"""The LoLCATs / Based hybrid on one block of tokens: softmax over the last W tokens plus linear attention
over everything older, as unnormalised numerator and denominator (so state passing and the division can
happen outside).

For query t (LoLCATs, Zhang et al. 2024, arXiv:2410.10254, eq. 6)::

    m_t   = max_{t-W < j <= t} s_tj                     s_tj = scale_sm * q_t . k_j   (raw q/k)
    num_t = sum_{t-W < j <= t} exp(s_tj - m_t) v_j  +  phi(q_t) . sum_{j <= t-W} phi(k_j) v_j^T
    den_t = sum_{t-W < j <= t} exp(s_tj - m_t)      +  phi(q_t) . sum_{j <= t-W} phi(k_j)
    out_t = num_t / (den_t + eps)

The window softmax is stabilised by its own row max and the linear term is not rescaled: the learned
feature map absorbs the scale (as in LoLCATs; the max is differentiable, as there). The linear part is
plain causal linear attention on keys/values shifted right by W tokens (k'_t = phi(k_{t-W})), so it runs
through the chunked kernel unchanged, and its state passes between context-parallel ranks unchanged.
``prefix_*`` hold the W tokens before the block (the previous rank's tail); without them the block is the
sequence start.

This file is the definition (plain torch: ``window_softmax_torch`` + the chunked linear kernel). On CUDA
(and under TRITON_INTERPRET=1) for non-fp64 inputs, ``hybrid_parts`` and ``hybrid_attention`` run the fused
Triton kernel of ``window.py`` instead (same maths; the tests compare the two).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import linear_attention, use_triton


class HybridParts(NamedTuple):
    num: torch.Tensor
    """Numerator [B, S, Hq, V] fp32 (fp64 for fp64 inputs)."""
    den: torch.Tensor
    """Denominator [B, S, Hq], same dtype."""
    state: Optional[torch.Tensor]
    """Linear state of the shifted block [B, Hkv, F, V] (the block's own contribution plus initial_state)."""
    z: Optional[torch.Tensor]
    """Normaliser state [B, Hkv, F]."""


def _cd(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def shift_right(x: torch.Tensor, prefix: Optional[torch.Tensor], shift: int) -> torch.Tensor:
    """x [B, S, H, D] -> x' with x'_t = x_{t - shift}, drawing from ``prefix`` [B, P<=shift, H, D] (its last
    tokens are the ones just before x) and zeros before that."""
    b, s, h, d = x.shape
    pre = x.new_zeros(b, shift, h, d)
    if prefix is not None and prefix.shape[1] > 0:
        p = prefix[:, -shift:]
        pre = torch.cat([pre[:, : shift - p.shape[1]], p.to(x.dtype)], dim=1)
    return torch.cat([pre, x], dim=1)[:, :s]


def window_softmax_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, scale: float,
                         prefix_k: Optional[torch.Tensor] = None, prefix_v: Optional[torch.Tensor] = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Banded softmax over the last ``window`` keys (self included), blocked so memory is O(S * 2W).

    q [B, S, Hq, D], k/v [B, S, Hkv, D(v)], prefix_k/v [B, P<=W, Hkv, D] -> (num [B, S, Hq, V], den [B, S, Hq])
    in the compute dtype, both scaled by exp(-row max). Query blocks of W tokens attend to their own block
    and the previous one ([B, S/W, Hkv, G, W, 2W] scores); GQA by broadcasting.
    """
    b, s, hq, d = q.shape
    hkv, dv = k.shape[2], v.shape[3]
    g = hq // hkv
    w = window
    cd = _cd(q)
    nb = -(-s // w)
    p = 0 if prefix_k is None else min(prefix_k.shape[1], w)
    # ext: [W slots of prefix (left-padded), the block, right padding to a multiple of W]
    pad_r = nb * w - s
    def ext(x, pre):
        parts = [x.new_zeros(b, w - p, hkv, x.shape[3])]
        if p:
            parts.append(pre[:, -p:].to(x.dtype))
        parts += [x, x.new_zeros(b, pad_r, hkv, x.shape[3])]
        return torch.cat(parts, dim=1).to(cd)  # [B, (nb+1)W, Hkv, D]
    ke, ve = ext(k, prefix_k), ext(v, prefix_v)
    valid = torch.zeros((nb + 1) * w, dtype=torch.bool, device=q.device)
    valid[w - p: w + s] = True
    def blocks(x):  # [B, (nb+1)W, ...] -> [B, nb, 2W, ...]: block i covers ext positions [iW, iW + 2W)
        return torch.cat([x[:, : nb * w].unflatten(1, (nb, w)), x[:, w:].unflatten(1, (nb, w))], dim=2)
    kb, vb, vmask = blocks(ke), blocks(ve), blocks(valid[None])[0]  # [B, nb, 2W, Hkv, D], [nb, 2W]
    qb = torch.cat([q.to(cd), q.new_zeros(b, pad_r, hq, d, dtype=cd)], dim=1).view(b, nb, w, hkv, g, d)
    sc = torch.einsum("bnahgd,bnrhd->bnhgar", qb, kb) * scale  # [B, nb, Hkv, G, W, 2W]
    a = torch.arange(w, device=q.device)
    r = torch.arange(2 * w, device=q.device)
    band = (r[None, :] > a[:, None]) & (r[None, :] <= a[:, None] + w)  # query a sees keys a+1 .. a+W of the block
    mask = band[None] & vmask[:, None, :]  # [nb, W, 2W]
    sc = sc.masked_fill(~mask[None, :, None, None], float("-inf"))
    m = sc.amax(-1, keepdim=True)
    pr = torch.exp(sc - m)
    num = torch.einsum("bnhgar,bnrhd->bnahgd", pr, vb).reshape(b, nb * w, hq, dv)[:, :s]
    den = pr.sum(-1).permute(0, 1, 4, 2, 3).reshape(b, nb * w, hq)[:, :s]
    return num, den


def hybrid_parts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor, *,
                 window: int, scale: float, prefix_k: Optional[torch.Tensor] = None,
                 prefix_v: Optional[torch.Tensor] = None, prefix_fk: Optional[torch.Tensor] = None,
                 initial_state: Optional[torch.Tensor] = None, initial_z: Optional[torch.Tensor] = None,
                 output_final_state: bool = False) -> HybridParts:
    """Numerator and denominator of the hybrid (``window`` > 0) or of plain linear attention (``window`` = 0).

    q [B, S, Hq, D], k/v [B, S, Hkv, D]; fq [B, S, Hq, F], fk [B, S, Hkv, F] (feature-mapped q/k);
    prefix_* the tokens before the block ([B, P, Hkv, .], P <= window); initial_state [B, Hkv, F, V] and
    initial_z [B, Hkv, F] enter the linear term. The state returned covers the shifted keys (all but the
    block's last W tokens, which the next block's prefix carries).
    """
    cd = _cd(q)
    has_prefix = prefix_k is not None and prefix_k.shape[1] > 0
    if window > 0 and use_triton(q) and (not has_prefix or (prefix_v is not None and prefix_fk is not None)):
        return _hybrid_parts_fused(q, k, v, fq, fk, window=window, scale=scale,
                                   prefix=(prefix_k, prefix_v, prefix_fk) if has_prefix else None,
                                   initial_state=initial_state, initial_z=initial_z,
                                   output_final_state=output_final_state)
    if window > 0:
        fk_lin = shift_right(fk, prefix_fk, window)
        v_lin = shift_right(v, prefix_v, window)
    else:
        fk_lin, v_lin = fk, v
    lin = linear_attention(fq, fk_lin, v_lin.to(fq.dtype), scale=1.0, initial_state=initial_state,
                           initial_z=initial_z, with_den=True, output_final_state=output_final_state)
    num, den = lin.o.to(cd), lin.den.to(cd)
    if window > 0:
        num_w, den_w = window_softmax_torch(q, k, v, window=window, scale=scale, prefix_k=prefix_k,
                                            prefix_v=prefix_v)
        num, den = num + num_w, den + den_w
    return HybridParts(num, den, lin.state, lin.z)


def _hybrid_parts_fused(q, k, v, fq, fk, *, window, scale, prefix, initial_state, initial_z,
                        output_final_state) -> HybridParts:
    """``hybrid_parts`` through the fused kernel: the prefix is prepended (as extra keys; its query rows are
    zeros and dropped), the initial state enters in torch (phi(q) S_0, phi(q) z_0), and the final state is
    sum phi(k_j) v_j^T over every token that left the window (one einsum; autograd gives its gradient)."""
    from .window import hybrid_window_linear

    dt = q.dtype
    p = 0
    kx, vx, fkx = k, v.to(dt), fk.to(dt)
    qx, fqx = q, fq.to(dt)
    if prefix is not None:
        p = min(prefix[0].shape[1], window)
        kx, vx, fkx = (torch.cat([pre[:, -p:].to(dt), x], dim=1) for pre, x in zip(prefix, (kx, vx, fkx)))
        qx, fqx = (torch.cat([x.new_zeros(x.shape[0], p, *x.shape[2:]), x], dim=1) for x in (qx, fqx))
    num, den = hybrid_window_linear(qx, kx, vx, fqx, fkx, window=window, scale=scale, normalize=False)
    num, den = num[:, p:], den[:, p:]
    b, s, hq, f = fq.shape
    hkv = k.shape[2]
    cd = num.dtype
    fqg = fq.to(cd).view(b, s, hkv, hq // hkv, f)
    if initial_state is not None:
        num = num + torch.einsum("bshgf,bhfv->bshgv", fqg, initial_state.to(cd)).reshape(num.shape)
    if initial_z is not None:
        den = den + torch.einsum("bshgf,bhf->bshg", fqg, initial_z.to(cd)).reshape(den.shape)
    state = z = None
    if output_final_state:
        n_old = max(kx.shape[1] - window, 0)  # tokens of prefix + block that left the window
        fk_o, v_o = fkx[:, :n_old].to(cd), vx[:, :n_old].to(cd)
        state = torch.einsum("bthf,bthv->bhfv", fk_o, v_o)
        z = fk_o.sum(1)
        if initial_state is not None:
            state = state + initial_state.to(cd)
        if initial_z is not None:
            z = z + initial_z.to(cd)
    return HybridParts(num, den, state, z)


def hybrid_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor, *,
                     window: int, scale: float, eps: float) -> torch.Tensor:
    """The normalised hybrid of one sequence per row: out = num / (den + eps) [B, S, Hq, V] in q's dtype.
    Shapes as ``hybrid_parts``. The fused kernel writes the normalised output once (no fp32 num/den)."""
    if window > 0 and use_triton(q):
        from .window import hybrid_window_linear

        dt = q.dtype
        return hybrid_window_linear(q, k, v.to(dt), fq.to(dt), fk.to(dt), window=window, scale=scale, eps=eps,
                                    normalize=True)[0]
    p = hybrid_parts(q, k, v, fq, fk, window=window, scale=scale)
    return (p.num / (p.den[..., None] + eps)).to(q.dtype)
