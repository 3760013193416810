"""RoPE frequencies and scaling (placeholder: plain RoPE; scaling recipes are added here)."""

from __future__ import annotations

import torch


def inv_freq_and_scaling(args) -> tuple[torch.Tensor, float]:
    """Inverse frequencies fp32 [head_dim/2] and the attention (cos/sin) scaling factor for ``args``."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    if args.rope_scaling:
        raise NotImplementedError("rope scaling not implemented yet")
    return inv_freq.float(), 1.0
