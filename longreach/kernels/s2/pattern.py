"""The S2 (sparse-sharded, LongGen-style) attention pattern: which key blocks each kv head sees.

Blocks are ``block`` tokens counted from each document's start. For kv head h, query block qb sees key block
kb <= qb iff
- local window: qb - kb < window // block (the diagonal block included; causal inside it), or
- sink: kb < sink // block, or
- its shard: kb % stride == h % stride,
so the heads of a layer together cover the whole context (every block when stride <= kv heads). Heads listed in
``dense_heads`` see every earlier block. A dense layer is simply attention 'flash'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class S2Pattern:
    """Sparse-sharded pattern; sizes in tokens."""

    block: int = 128
    """Block size in tokens (multiple of 16; of 64 on GPU, best 128)."""
    window: int = 2048
    """Local window in tokens (multiple of block, at least one block: the diagonal)."""
    sink: int = 128
    """Sink (attention-sink prefix) in tokens (multiple of block; 0 for none)."""
    stride: int = 8
    """Shard stride in blocks: kv head h takes blocks b with b % stride == h % stride."""
    dense_heads: tuple = ()
    """kv heads that attend densely (all earlier blocks)."""

    def validate(self, num_kv_heads: int) -> "S2Pattern":
        if self.block < 16 or self.block % 16:
            raise ValueError(f"s2 block={self.block} must be a positive multiple of 16 (128 is best on GPU)")
        if self.window < self.block or self.window % self.block:
            raise ValueError(f"s2 window={self.window} must be a multiple of block={self.block} and at least one "
                             "block (the diagonal block)")
        if self.sink < 0 or self.sink % self.block:
            raise ValueError(f"s2 sink={self.sink} must be a multiple of block={self.block} (0 for none)")
        if self.stride < 1:
            raise ValueError(f"s2 stride={self.stride} must be >= 1")
        bad = [h for h in self.dense_heads if not 0 <= int(h) < num_kv_heads]
        if bad:
            raise ValueError(f"s2 dense_heads {bad} out of range for {num_kv_heads} kv heads")
        return self

    def dense_mask(self, num_kv_heads: int, device=None) -> torch.Tensor:
        """int32 [Hkv]: 1 where the kv head is dense."""
        m = torch.zeros(num_kv_heads, dtype=torch.int32, device=device)
        if self.dense_heads:
            m[torch.tensor([int(h) for h in self.dense_heads], dtype=torch.long)] = 1
        return m

    def visible(self, qb: torch.Tensor, kb: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """Block-level visibility, broadcasting integer tensors (query block, key block, kv head) -> bool.
        Pure tensor arithmetic, so it also serves as a FlexAttention mask_mod."""
        dense = torch.zeros_like(head, dtype=torch.bool)
        for h in self.dense_heads:
            dense = dense | (head == int(h))
        window = (qb - kb) < (self.window // self.block)
        sink = kb < (self.sink // self.block)
        shard = (kb % self.stride) == (head % self.stride)
        return (kb <= qb) & (window | sink | shard | dense)

    def token_mask(self, sq: int, num_kv_heads: int, device=None) -> torch.Tensor:
        """bool [Hkv, sq, sq] for one document (causal included)."""
        i = torch.arange(sq, device=device)
        qb, kb = (i // self.block)[:, None], (i // self.block)[None, :]
        heads = torch.arange(num_kv_heads, device=device)[:, None, None]
        return self.visible(qb[None], kb[None], heads) & (i[None, :] <= i[:, None])[None]

    def flex_mask_mod(self, group: int):
        """mask_mod(b, h, q_idx, kv_idx) for torch FlexAttention over one document (h = query head)."""

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & self.visible(q_idx // self.block, kv_idx // self.block, h // group)

        return mask_mod

    def density(self, seqlen: int, num_kv_heads: int) -> float:
        """Fraction of the causal (q, k) pairs attended, averaged over kv heads (for FLOP counts)."""
        nb = -(-seqlen // self.block)
        b = torch.arange(nb)
        vis = self.visible(b[None, :, None], b[None, None, :], torch.arange(num_kv_heads)[:, None, None])
        # off-diagonal blocks count block^2 pairs, diagonal ones about half
        off = (vis & (b[:, None] > b[None, :])).sum().item()
        pairs = off * self.block ** 2 + nb * num_kv_heads * self.block * (self.block + 1) / 2
        return pairs / (num_kv_heads * seqlen * (seqlen + 1) / 2)


def as_pattern(block: int, window: int, sink: int, stride: int, dense_heads: Sequence[int] = ()) -> S2Pattern:
    """Keyword arguments -> S2Pattern."""
    return S2Pattern(int(block), int(window), int(sink), int(stride), tuple(int(h) for h in dense_heads))
