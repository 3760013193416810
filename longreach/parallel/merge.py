"""The one (out, lse) merge: combine softmax attention over disjoint key sets, in fp32 (or fp64).

For two partial results over key sets A and B, lse = log(e^lse_A + e^lse_B) and
out = e^(lse_A - lse) out_A + e^(lse_B - lse) out_B. Both weights are exponents of differences against the merged
lse (logaddexp), so neither exceeds 1 and nothing overflows when one block dominates; the accumulators stay in
fp32/fp64 so rounding does not compound with the number of merged blocks (ring size). Same algebra as
ring-flash-attention's ``update_out_and_lse`` and flash-attention 2's online softmax (Dao 2023, sec. 3.1).
"""

from __future__ import annotations

import torch


def merge_(out: torch.Tensor, lse: torch.Tensor, blk_out: torch.Tensor, blk_lse: torch.Tensor) -> None:
    """In place: fold a block result into the running accumulators.

    out/blk_out [B, S, H, D] and lse/blk_lse [B, H, S] in fp32/fp64 (the accumulators must be at least as wide).
    Rows where both lse are -inf (no visible key yet) stay (0, -inf).
    """
    assert out.dtype in (torch.float32, torch.float64) and lse.dtype == out.dtype, "merge accumulators must be fp32/fp64"
    new = torch.logaddexp(lse, blk_lse.to(lse.dtype))
    finite = torch.isfinite(new)
    safe = torch.where(finite, new, torch.zeros_like(new))
    w_old = torch.where(finite, torch.exp(lse - safe), torch.zeros_like(new))  # [B, H, S]
    w_blk = torch.where(finite, torch.exp(blk_lse.to(lse.dtype) - safe), torch.zeros_like(new))
    out.mul_(w_old.transpose(1, 2)[..., None]).add_(w_blk.transpose(1, 2)[..., None] * blk_out.to(out.dtype))
    lse.copy_(new)
