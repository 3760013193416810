"""Plain-torch causal linear attention: the quadratic masked form, the recurrent form and a chunked form.

All three compute, for query t of head h (KV head ``h // G`` under GQA, G = Hq / Hkv)::

    S_t = S_0 + sum_{j <= t} k_j v_j^T            # state [K, V], per KV head
    z_t = z_0 + sum_{j <= t} k_j                  # normaliser state [K], per KV head
    o_t = scale * q_t S_t                         # numerator [V]
    den_t = scale * q_t . z_t                     # denominator (only with ``with_den``)

q/k are already feature-mapped (phi(q), phi(k)); nothing is normalised here, so the numerator and
denominator can be combined with other terms (the sliding window) before the division.
Computation is in fp64 for fp64 inputs and fp32 otherwise; outputs keep the input dtype except ``den``
and the states, which are in the compute dtype. Loops are fine here: this is the test oracle.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class LinearAttnOut(NamedTuple):
    """What every linear-attention implementation returns."""

    o: torch.Tensor
    """Numerator [B, T, Hq, V], input dtype."""
    den: Optional[torch.Tensor]
    """Denominator [B, T, Hq] fp32/fp64, or None without ``with_den``."""
    state: Optional[torch.Tensor]
    """Final state S_T [B, Hkv, K, V] fp32/fp64, or None unless asked for."""
    z: Optional[torch.Tensor]
    """Final normaliser state z_T [B, Hkv, K], or None unless asked for with ``with_den``."""


def _cdtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q/k/v must be [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, t, hq, kd = q.shape
    if k.shape[:2] != (b, t) or v.shape[:3] != k.shape[:3] or k.shape[3] != kd:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if hq % k.shape[2] != 0:
        raise ValueError(f"query heads {hq} must be a multiple of key/value heads {k.shape[2]}")
    return hq // k.shape[2]


def _group(q: torch.Tensor, hkv: int) -> torch.Tensor:
    # [B, T, Hq, K] -> [B, T, Hkv, G, K]: query head h belongs to KV head h // G
    b, t, hq, kd = q.shape
    return q.view(b, t, hkv, hq // hkv, kd)


def linear_attention_quadratic(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float = 1.0,
                               initial_state: Optional[torch.Tensor] = None, initial_z: Optional[torch.Tensor] = None,
                               with_den: bool = False, output_final_state: bool = False) -> LinearAttnOut:
    """Masked [T, T] form. q [B, T, Hq, K], k [B, T, Hkv, K], v [B, T, Hkv, V]; states [B, Hkv, K(, V)]."""
    _check(q, k, v)
    cd = _cdtype(q)
    b, t, hq, kd = q.shape
    hkv = k.shape[2]
    qg, kk, vv = _group(q, hkv).to(cd), k.to(cd), v.to(cd)
    a = torch.einsum("bthgk,bshk->bhgts", qg, kk)  # [B, Hkv, G, T, T]
    a = a.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=q.device).tril(), 0.0)
    o = torch.einsum("bhgts,bshv->bthgv", a, vv)
    if initial_state is not None:
        o = o + torch.einsum("bthgk,bhkv->bthgv", qg, initial_state.to(cd))
    den = None
    if with_den:
        den = a.sum(-1).permute(0, 3, 1, 2)  # [B, T, Hkv, G]
        if initial_z is not None:
            den = den + torch.einsum("bthgk,bhk->bthg", qg, initial_z.to(cd))
        den = (den * scale).reshape(b, t, hq)
    state = z = None
    if output_final_state:
        state = torch.einsum("bshk,bshv->bhkv", kk, vv)
        if initial_state is not None:
            state = state + initial_state.to(cd)
        if with_den:
            z = kk.sum(1) + (initial_z.to(cd) if initial_z is not None else 0.0)
    return LinearAttnOut((o * scale).reshape(b, t, hq, -1).to(q.dtype), den, state, z)


def linear_attention_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float = 1.0,
                               initial_state: Optional[torch.Tensor] = None, initial_z: Optional[torch.Tensor] = None,
                               with_den: bool = False, output_final_state: bool = False) -> LinearAttnOut:
    """Token-by-token recurrence (the generation path's arithmetic). Shapes as ``linear_attention_quadratic``."""
    _check(q, k, v)
    cd = _cdtype(q)
    b, t, hq, kd = q.shape
    hkv, vd = k.shape[2], v.shape[3]
    qg = _group(q, hkv).to(cd)
    s = initial_state.to(cd).clone() if initial_state is not None else q.new_zeros(b, hkv, kd, vd, dtype=cd)
    z = initial_z.to(cd).clone() if initial_z is not None else q.new_zeros(b, hkv, kd, dtype=cd)
    outs, dens = [], []
    for i in range(t):
        s, z, o_i, den_i = recurrent_step(qg[:, i], k[:, i].to(cd), v[:, i].to(cd), s, z, scale=scale)
        outs.append(o_i)
        dens.append(den_i)
    o = torch.stack(outs, 1).reshape(b, t, hq, vd).to(q.dtype)
    den = torch.stack(dens, 1).reshape(b, t, hq) if with_den else None
    return LinearAttnOut(o, den, s if output_final_state else None, z if (output_final_state and with_den) else None)


def recurrent_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor, z: torch.Tensor, *,
                   scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One generation step. q [B, Hkv, G, K], k [B, Hkv, K], v [B, Hkv, V], state [B, Hkv, K, V], z [B, Hkv, K]
    -> (new state, new z, numerator [B, Hkv, G, V], denominator [B, Hkv, G])."""
    state = state + k[..., :, None] * v[..., None, :]
    z = z + k
    o = torch.einsum("bhgk,bhkv->bhgv", q, state) * scale
    den = torch.einsum("bhgk,bhk->bhg", q, z) * scale
    return state, z, o, den


def linear_attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float = 1.0,
                             initial_state: Optional[torch.Tensor] = None, initial_z: Optional[torch.Tensor] = None,
                             with_den: bool = False, output_final_state: bool = False,
                             chunk: int = 64) -> LinearAttnOut:
    """The chunked algorithm the Triton kernel implements, in torch (the CPU fast path): intra-chunk masked
    products plus the state carried between chunks. Shapes as ``linear_attention_quadratic``."""
    _check(q, k, v)
    cd = _cdtype(q)
    b, t, hq, kd = q.shape
    hkv, vd = k.shape[2], v.shape[3]
    qg, kk, vv = _group(q, hkv).to(cd), k.to(cd), v.to(cd)
    s = initial_state.to(cd) if initial_state is not None else q.new_zeros(b, hkv, kd, vd, dtype=cd)
    z = initial_z.to(cd) if initial_z is not None else q.new_zeros(b, hkv, kd, dtype=cd)
    outs, dens = [], []
    for a0 in range(0, t, chunk):
        qc, kc, vc = qg[:, a0:a0 + chunk], kk[:, a0:a0 + chunk], vv[:, a0:a0 + chunk]
        n = qc.shape[1]
        a = torch.einsum("bthgk,bshk->bhgts", qc, kc).masked_fill(
            ~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), 0.0)
        outs.append(torch.einsum("bhgts,bshv->bthgv", a, vc) + torch.einsum("bthgk,bhkv->bthgv", qc, s))
        if with_den:
            dens.append(a.sum(-1).permute(0, 3, 1, 2) + torch.einsum("bthgk,bhk->bthg", qc, z))
        s = s + torch.einsum("bshk,bshv->bhkv", kc, vc)
        z = z + kc.sum(1)
    o = (torch.cat(outs, 1) * scale).reshape(b, t, hq, vd).to(q.dtype)
    den = (torch.cat(dens, 1) * scale).reshape(b, t, hq) if with_den else None
    return LinearAttnOut(o, den, s if output_final_state else None, z if (output_final_state and with_den) else None)
