"""``linear``: normalised linear attention with a learned feature map, optionally hybrid with a sliding-window
softmax (LoLCATs / Based), as a drop-in for a pretrained model's softmax layers.

Options (``AttnSpec.options``, e.g. ``model.attention_options``):
  feature_map  'hedgehog' (default) | 'taylor' | 'elu'    see ``feature_maps.py``
  feature_dim  projection width of hedgehog/taylor (default 64 for hedgehog, 16 for taylor)
  window       sliding-window softmax width W (default 0: pure linear); the hybrid of ``kernels/linear_attention/hybrid.py``
  eps          added to the denominator (default 1e-6)

One rank: ``ctx.cu_seqlens`` packed documents are run one document at a time (the state resets at every
document start). Context-parallel (``ctx.parallel`` set): state passing through ``parallel/linear_cp.py``;
``ctx.parallel`` must carry ``group``, ``chunk_ids`` and ``num_chunks`` (the shard plan's ``CPAttnInfo`` or
``parallel.linear_cp.LinearCP``), optionally ``all_chunk_ids`` and ``doc_ids`` (packed documents).

Distillation (LoLCATs stage 1, "attention transfer"): ``attention_transfer_loss(student, q, k, v, ctx=ctx)``
runs the teacher's softmax attention (``dense``, no grad) and the student on the same q/k/v and returns
(MSE, student_out, teacher_out); only the feature map (the student's parameters) gets gradients from it.

Generation: ``prefill`` returns the output and a ``LinearCache`` (the linear state plus the last W raw
keys/values: nothing else grows with length); ``decode_step`` advances it one token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.linear_attention import recurrent_step
from ..kernels.linear_attention.hybrid import hybrid_attention, hybrid_parts
from .context import AttnContext
from .feature_maps import build_feature_map
from .registry import AttnSpec, register

_DEFAULT_FEATURE_DIM = {"hedgehog": 64, "taylor": 16, "elu": 0}
_OPTIONS = ("feature_map", "feature_dim", "window", "eps")


@dataclass
class LinearCache:
    """Generation cache of one layer: the linear state over tokens older than the window, and the window."""

    state: torch.Tensor
    """sum phi(k_j) v_j^T over tokens that left the window, fp32 (fp64 for fp64 inputs) [B, Hkv, F, V]."""
    z: torch.Tensor
    """sum phi(k_j) over the same tokens, fp32 [B, Hkv, F]."""
    k_win: torch.Tensor
    """The last <= W raw keys [B, <=W, Hkv, D]."""
    v_win: torch.Tensor
    """Their values [B, <=W, Hkv, D]."""


@register("linear")
class LinearAttention(nn.Module):
    """Hybrid linear attention for one layer; owns the learned feature maps (separate for q and k, per KV head)."""

    def __init__(self, spec: AttnSpec):
        super().__init__()
        opts = dict(spec.options)
        unknown = set(opts) - set(_OPTIONS)
        if unknown:
            raise ValueError(f"attention 'linear' got unknown options {sorted(unknown)}; valid: {', '.join(_OPTIONS)}")
        fmap = opts.get("feature_map", "hedgehog")
        fdim = int(opts.get("feature_dim", _DEFAULT_FEATURE_DIM.get(fmap, 0)))
        self.window = int(opts.get("window", 0))
        self.eps = float(opts.get("eps", 1e-6))
        if self.window < 0:
            raise ValueError(f"attention option window={self.window} must be >= 0 (0 = pure linear attention)")
        if spec.num_heads % spec.num_kv_heads != 0:
            raise ValueError(f"num_heads={spec.num_heads} must be a multiple of num_kv_heads={spec.num_kv_heads}")
        self.spec = spec
        self.feature_map_name = fmap
        kw = dict(num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, feature_dim=fdim)
        self.feature_map_q = build_feature_map(fmap, **kw)
        self.feature_map_k = build_feature_map(fmap, **kw)

    def extra_repr(self) -> str:
        return f"feature_map={self.feature_map_name!r}, window={self.window}, eps={self.eps}"

    def _scale(self, ctx: AttnContext, d: int) -> float:
        return ctx.scale if ctx.scale is not None else d ** -0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ctx: AttnContext) -> torch.Tensor:
        """q [B, S, Hq, D], k/v [B, S, Hkv, D] -> out [B, S, Hq, D] (q's dtype)."""
        if not ctx.causal:
            raise ValueError("attention 'linear' is causal only; set AttnContext.causal=True")
        scale = self._scale(ctx, q.shape[-1])
        fq, fk = self.feature_map_q(q), self.feature_map_k(k)
        if ctx.parallel is not None:
            return self._forward_cp(q, k, v, fq, fk, scale, ctx)
        if ctx.cu_seqlens is None:
            return self._one(q, k, v, fq, fk, scale)
        b, s = q.shape[:2]
        cu = ctx.cu_seqlens.tolist()
        if cu[-1] != b * s:
            raise ValueError(f"ctx.cu_seqlens ends at {cu[-1]}, expected B*S={b * s}")
        flat = [x.reshape(1, b * s, *x.shape[2:]) for x in (q, k, v, fq, fk)]
        outs = [self._one(*(x[:, a:e] for x in flat), scale) for a, e in zip(cu[:-1], cu[1:]) if e > a]
        return torch.cat(outs, dim=1).view(b, s, *outs[0].shape[2:])

    def _one(self, q, k, v, fq, fk, scale) -> torch.Tensor:
        # fused window + linear kernel on GPU (normalised output written once); torch definition otherwise
        return hybrid_attention(q, k, v, fq, fk, window=self.window, scale=scale, eps=self.eps)

    def _forward_cp(self, q, k, v, fq, fk, scale, ctx: AttnContext) -> torch.Tensor:
        from ..parallel.linear_cp import hybrid_attention_cp

        par = ctx.parallel
        missing = [a for a in ("group", "chunk_ids", "num_chunks") if getattr(par, a, None) is None]
        if missing:
            raise ValueError(f"attention 'linear' under context parallelism needs ctx.parallel with {missing} "
                             "(the shard plan's CPAttnInfo, built with group=mesh.cp_group, or "
                             "longreach.parallel.linear_cp.LinearCP)")
        if ctx.cu_seqlens is not None:
            raise ValueError("attention 'linear' with context parallelism takes packed documents as "
                             "ctx.parallel.doc_ids (global per-token ids, as the shard plan builds them), not "
                             "ctx.cu_seqlens; leave ctx.cu_seqlens None under CP")
        return hybrid_attention_cp(q, k, v, fq, fk, window=self.window, scale=scale, eps=self.eps, group=par.group,
                                   chunk_ids=tuple(par.chunk_ids), num_chunks=int(par.num_chunks),
                                   all_chunk_ids=getattr(par, "all_chunk_ids", None),
                                   doc_ids=getattr(par, "doc_ids", None))

    # ---- generation -------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ctx: AttnContext
                ) -> tuple[torch.Tensor, LinearCache]:
        """Full-prompt forward (one document per row) that also returns the generation cache."""
        scale = self._scale(ctx, q.shape[-1])
        fq, fk = self.feature_map_q(q), self.feature_map_k(k)
        p = hybrid_parts(q, k, v, fq, fk, window=self.window, scale=scale, output_final_state=True)
        out = (p.num / (p.den[..., None] + self.eps)).to(q.dtype)
        w = self.window
        cache = LinearCache(p.state, p.z, k[:, k.shape[1] - w:] if w else k[:, :0],
                            v[:, v.shape[1] - w:] if w else v[:, :0])
        return out, cache

    @torch.no_grad()
    def decode_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LinearCache, *,
                    ctx: AttnContext) -> tuple[torch.Tensor, LinearCache]:
        """One new token: q [B, 1, Hq, D], k/v [B, 1, Hkv, D] -> (out [B, 1, Hq, D], updated cache)."""
        scale = self._scale(ctx, q.shape[-1])
        b, _, hq, d = q.shape
        hkv = k.shape[2]
        cd = cache.state.dtype  # fp32 (fp64 for fp64 inputs), as the prefill left it
        k_all = torch.cat([cache.k_win, k], dim=1)
        v_all = torch.cat([cache.v_win, v], dim=1)
        state, z = cache.state, cache.z
        if self.window and k_all.shape[1] > self.window:
            # the oldest key leaves the window: fold it into the linear state
            fk_old = self.feature_map_k(k_all[:, :1]).to(cd)[:, 0]  # [B, Hkv, F]
            state, z, _, _ = recurrent_step(fk_old.new_zeros(b, hkv, 1, fk_old.shape[-1]), fk_old,
                                            v_all[:, 0].to(cd), state, z)
            k_all, v_all = k_all[:, 1:], v_all[:, 1:]
        fq = self.feature_map_q(q).to(cd)[:, 0].view(b, hkv, hq // hkv, -1)  # [B, Hkv, G, F]
        if self.window:
            num_l = torch.einsum("bhgf,bhfv->bhgv", fq, state)
            den_l = torch.einsum("bhgf,bhf->bhg", fq, z)
            qg = q.to(cd)[:, 0].view(b, hkv, hq // hkv, d)
            sc = torch.einsum("bhgd,bwhd->bhgw", qg, k_all.to(cd)) * scale
            pr = torch.exp(sc - sc.amax(-1, keepdim=True))
            num = num_l + torch.einsum("bhgw,bwhd->bhgd", pr, v_all.to(cd))
            den = den_l + pr.sum(-1)
        else:
            fk1 = self.feature_map_k(k).to(cd)[:, 0]
            state, z, num, den = recurrent_step(fq, fk1, v[:, 0].to(cd), state, z)
            k_all, v_all = k_all[:, :0], v_all[:, :0]
        out = (num / (den[..., None] + self.eps)).reshape(b, 1, hq, -1).to(q.dtype)
        return out, LinearCache(state, z, k_all, v_all)


def attention_transfer_loss(student: LinearAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                            ctx: AttnContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoLCATs attention transfer: MSE between the student's output and the teacher's softmax output on the
    same q/k/v [B, S, H, D] (one rank). The teacher runs without grad (q/k/v are detached for it).
    Returns (loss fp32 scalar, student_out, teacher_out)."""
    from .dense import dense_attention

    with torch.no_grad():
        teacher = dense_attention(q.detach(), k.detach(), v.detach(), ctx=ctx)
    out = student(q, k, v, ctx=ctx)
    return F.mse_loss(out.float(), teacher.float()), out, teacher
