"""The per-batch attention context: everything an attention implementation needs besides q, k, v."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass(frozen=True)
class AttnContext:
    """Built once per batch (by the data pipeline or the shard plan) and handed to every attention call.

    Shapes follow the attention contract: q [B, S, Hq, D], k/v [B, S, Hkv, D], where S is the local
    (per-rank) sequence length. Packed documents are described over the flattened [B*S] token axis,
    flash-attn style: ``cu_seqlens`` int32 [n_docs + 1] with row boundaries always being document
    boundaries. ``None`` means each batch row is one document.
    """

    causal: bool = True
    """Causal (decoder) masking."""
    scale: Optional[float] = None
    """Softmax scale; None means 1/sqrt(head_dim)."""
    cu_seqlens: Optional[torch.Tensor] = None
    """int32 [n_docs+1] document boundaries over the flattened local [B*S] tokens (None: one doc per row)."""
    max_seqlen: Optional[int] = None
    """Longest document in ``cu_seqlens`` (kernels size their grids with it)."""
    parallel: Any = None
    """Context-parallel information (process groups, strategy, shard plan) built by ``longreach.parallel``; None on one rank."""
    extra: dict = field(default_factory=dict)
    """Implementation-specific, per-batch read-only extras (e.g. a precomputed block mask)."""

    def doc_ids(self, batch: int, seqlen: int, device: torch.device) -> Optional[torch.Tensor]:
        """Document id per token, int64 [B, S], or None when there is one document per row."""
        if self.cu_seqlens is None:
            return None
        cu = self.cu_seqlens.to(device=device, dtype=torch.long)
        total = batch * seqlen
        if int(cu[-1]) != total:
            raise ValueError(
                f"AttnContext.cu_seqlens ends at {int(cu[-1])} but the batch has {batch}x{seqlen}={total} tokens; "
                "build cu_seqlens over the flattened [B*S] tokens of this batch"
            )
        lengths = cu[1:] - cu[:-1]
        ids = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
        return ids.view(batch, seqlen)


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document boundaries from packed position ids [B, S] (a new document starts where the position is 0).

    Row starts are always boundaries. Returns int32 [n_docs + 1] over the flattened [B*S] tokens.
    """
    b, s = position_ids.shape
    starts = position_ids == 0
    starts[:, 0] = True
    idx = torch.nonzero(starts.reshape(-1), as_tuple=False).flatten()
    end = torch.tensor([b * s], device=position_ids.device, dtype=idx.dtype)
    return torch.cat([idx, end]).to(torch.int32)
