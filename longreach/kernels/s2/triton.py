"""S2 attention through the shared Triton kernels (``kernels/flash/triton.py``, SPARSE=True).

The kernels walk, per (query tile, kv head), the sink blocks, the head's strided shard and the local window,
computed arithmetically; the q heads of a GQA group are packed into one tile (PACK = group), so each loaded K/V
block serves the whole group.
"""

from __future__ import annotations

import torch

from ..flash.triton import SparseArgs
from .pattern import S2Pattern


def sparse_args(pattern: S2Pattern, num_kv_heads: int, device: torch.device) -> SparseArgs:
    """Kernel arguments (block units) for ``pattern``."""
    return SparseArgs(block=pattern.block, window_blocks=pattern.window // pattern.block,
                      sink_blocks=pattern.sink // pattern.block, stride=pattern.stride,
                      dense_heads=pattern.dense_mask(num_kv_heads, device=device))
