"""Attention kernels (Triton, with plain-torch references): flash attention with lse, and S2 sparse attention."""

from .flash import flash_attention, flash_attention_block, flash_attention_block_backward
from .s2 import s2_attention

__all__ = ["flash_attention", "flash_attention_block", "flash_attention_block_backward", "s2_attention"]
