"""One packed micro-batch: the unit the data pipeline yields and the trainer and shard plan consume."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from ..attention.context import AttnContext


@dataclass
class Batch:
    """Packed token sequences with document structure.

    ``labels`` are already shifted: ``labels[b, t]`` is the token that follows ``input_ids[b, t]`` in the same
    document, and -100 where there is none (a document's last token, padding). So sharding along the
    sequence never needs a neighbour's token.
    """

    input_ids: torch.Tensor
    """int64 [B, S]"""
    labels: torch.Tensor
    """int64 [B, S], -100 = not scored"""
    position_ids: torch.Tensor
    """int64 [B, S], restarting at 0 at each packed document"""
    cu_seqlens: Optional[torch.Tensor] = None
    """int32 [n_docs+1] over the flattened [B*S] tokens (None: one document per row)"""

    def to(self, device) -> "Batch":
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            labels=self.labels.to(device),
            position_ids=self.position_ids.to(device),
            cu_seqlens=None if self.cu_seqlens is None else self.cu_seqlens.to(device),
        )

    @property
    def num_tokens(self) -> int:
        """Tokens that carry a loss (labels != -100)."""
        return int((self.labels != -100).sum())

    def attn_context(self, causal: bool = True) -> AttnContext:
        if self.cu_seqlens is None:
            return AttnContext(causal=causal)
        lengths = self.cu_seqlens[1:] - self.cu_seqlens[:-1]
        return AttnContext(causal=causal, cu_seqlens=self.cu_seqlens, max_seqlen=int(lengths.max()))
