"""Feature maps phi for linear attention, applied per KV head (GQA: a query head uses its KV head's map).

Every map takes x [B, S, H, D] with H a multiple of ``num_kv_heads`` (queries: Hq heads, keys: Hkv heads)
and returns phi(x) [B, S, H, F] in x's dtype; learned maps compute in fp32.

- ``hedgehog`` (Zhang et al. 2024, arXiv:2402.04347; LoLCATs arXiv:2410.10254): phi(x) = [softmax(x W_h + b_h),
  softmax(-(x W_h + b_h))], W_h [D, feature_dim] learned per KV head, initialised to the identity (truncated
  or zero-padded), so F = 2 * feature_dim. On CUDA (and under TRITON_INTERPRET=1), for non-fp64 inputs, it
  runs as one Triton kernel (``kernels/linear_attention/hedgehog.py``); fp64 and plain CPU use torch.
- ``taylor`` (Based, Arora et al. 2024, arXiv:2402.18668): x' = x P_h (learned [D, feature_dim] per KV head,
  identity init), phi(x') = [1, x'/d^(1/4), vec(x' x'^T)/sqrt(2 d)] so phi(q).phi(k) = 1 + s + s^2/2 with
  s = q'.k'/sqrt(d): the 2nd-order Taylor expansion of exp(s). F = 1 + d + d^2 (d = feature_dim).
- ``elu``: phi(x) = elu(x) + 1 (Katharopoulos et al. 2020), F = D, no parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.linear_attention import use_triton

FEATURE_MAPS = ("hedgehog", "taylor", "elu")


def _cd(x: torch.Tensor) -> torch.dtype:
    # fp64 stays fp64 (exactness tests); everything else computes in fp32
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_kv_head(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # x [B, S, H, D] with H = Hkv * G; w [Hkv, D, F] -> [B, S, H, F] in fp32, never repeating w per query head
    b, s, h, d = x.shape
    hkv = w.shape[0]
    if h % hkv != 0:
        raise ValueError(f"feature map has {hkv} KV heads but the input has {h} heads (not a multiple)")
    xg = x.to(_cd(x)).view(b, s, hkv, h // hkv, d)
    return torch.einsum("bshgd,hdf->bshgf", xg, w.to(_cd(x))).reshape(b, s, h, -1)


def _identity_init(hkv: int, d: int, f: int) -> torch.Tensor:
    return torch.eye(d, f).expand(hkv, d, f).clone()


class HedgehogMap(nn.Module):
    """Learned softmax feature map (one [D, feature_dim] projection per KV head)."""

    def __init__(self, num_kv_heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        self.weight = nn.Parameter(_identity_init(num_kv_heads, head_dim, feature_dim))
        self.bias = nn.Parameter(torch.zeros(num_kv_heads, 1, feature_dim))
        self.out_dim = 2 * feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(x):
            from ..kernels.linear_attention.hedgehog import hedgehog_feature_map

            return hedgehog_feature_map(x, self.weight, self.bias)
        b, s, h, _ = x.shape
        hkv = self.weight.shape[0]
        proj = _per_kv_head(x, self.weight).view(b, s, hkv, h // hkv, -1)
        proj = proj + self.bias.to(proj.dtype)[None, None]
        proj = proj.reshape(b, s, h, -1)
        return torch.cat([proj.softmax(-1), (-proj).softmax(-1)], dim=-1).to(x.dtype)


class TaylorMap(nn.Module):
    """Based's 2nd-order Taylor feature map after a learned per-KV-head projection to ``feature_dim``."""

    def __init__(self, num_kv_heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        self.weight = nn.Parameter(_identity_init(num_kv_heads, head_dim, feature_dim))
        self.feature_dim = feature_dim
        self.out_dim = 1 + feature_dim + feature_dim ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.feature_dim
        xp = _per_kv_head(x, self.weight)  # [B, S, H, d] fp32
        x2 = (xp[..., :, None] * xp[..., None, :]).flatten(-2) / math.sqrt(2.0 * d)
        ones = torch.ones_like(xp[..., :1])
        return torch.cat([ones, xp / d ** 0.25, x2], dim=-1).to(x.dtype)


class EluMap(nn.Module):
    """elu(x) + 1: positive, parameter-free."""

    def __init__(self, num_kv_heads: int, head_dim: int, feature_dim: int = 0):
        super().__init__()
        self.out_dim = head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.elu(x.to(_cd(x))) + 1.0).to(x.dtype)


def build_feature_map(name: str, *, num_kv_heads: int, head_dim: int, feature_dim: int) -> nn.Module:
    """A feature map module by name (``FEATURE_MAPS``); ``feature_dim`` is ignored by ``elu``."""
    if name == "hedgehog":
        return HedgehogMap(num_kv_heads, head_dim, feature_dim)
    if name == "taylor":
        return TaylorMap(num_kv_heads, head_dim, feature_dim)
    if name == "elu":
        return EluMap(num_kv_heads, head_dim)
    raise ValueError(f"attention option feature_map={name!r} is unknown; use one of {', '.join(FEATURE_MAPS)}")
