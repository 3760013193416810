"""``dense``: softmax attention through torch SDPA, GQA without materialising repeated KV."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .context import AttnContext
from .registry import register


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale) -> torch.Tensor:
    # q [B, H, S, D]; k/v [B, Hkv, S, D]; enable_gqa broadcasts KV heads inside the kernel (no repeat_interleave copy)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


@register("dense")
def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ctx: AttnContext) -> torch.Tensor:
    """q [B, S, Hq, D], k/v [B, S, Hkv, D] -> out [B, S, Hq, D].

    Packed documents (``ctx.cu_seqlens``) are attended one document at a time, so no [S, S] mask is built.
    """
    if ctx.parallel is not None:
        raise ValueError(
            "attention 'dense' runs on one rank only but the batch is context-parallel; "
            "use model.attention='ring', 'ulysses' or 'hybrid' (or set parallel.cp=1)"
        )
    b, s, hq, d = q.shape
    if hq % k.shape[2] != 0:
        raise ValueError(f"query heads {hq} must be a multiple of key/value heads {k.shape[2]}")
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, S, D]
    if ctx.cu_seqlens is None:
        return _sdpa(qt, kt, vt, ctx.causal, ctx.scale).transpose(1, 2)
    cu = ctx.cu_seqlens.tolist()
    if cu[-1] != b * s:
        raise ValueError(f"ctx.cu_seqlens ends at {cu[-1]}, expected B*S={b * s}")
    # flatten rows: [1, H, B*S, D]; documents never cross a row boundary (packing guarantees it)
    qf = qt.transpose(0, 1).reshape(1, hq, b * s, d)
    kf = kt.transpose(0, 1).reshape(1, kt.shape[1], b * s, d)
    vf = vt.transpose(0, 1).reshape(1, vt.shape[1], b * s, d)
    outs = [_sdpa(qf[:, :, a:e], kf[:, :, a:e], vf[:, :, a:e], ctx.causal, ctx.scale) for a, e in zip(cu[:-1], cu[1:]) if e > a]
    out = torch.cat(outs, dim=2)  # [1, H, B*S, D]
    return out.reshape(hq, b, s, d).permute(1, 2, 0, 3)
