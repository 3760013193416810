"""FlashAttention-4's CuTe DSL kernels (PyPI ``flash-attn-4``, its sm_90 path: FlashAttention-3's design) as a peer
of ``longreach bench kernels``: dense causal, and the S2 pattern as block-sparse attention with the identical
FlexAttention block mask (its full blocks, and its partial, diagonal ones masked by a causal ``mask_mod``).

Optional: when ``flash_attn.cute`` does not import (it is not a dependency of longreach), ``methods`` returns
nothing and says why once.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

log = logging.getLogger(__name__)

_WHY: list = []


def available() -> Optional[str]:
    """None when flash_attn.cute imports, else the reason."""
    try:
        import flash_attn.cute  # noqa: F401
    except Exception as e:  # ImportError, or a CUDA/DSL library that does not load
        return f"{type(e).__name__}: {str(e)[:200]}"
    return None


def _causal_mask_mod():
    # the partial blocks of the S2 block mask are its diagonal ones: there the S2 mask is the causal one
    import cutlass.cute as cute

    @cute.jit
    def causal(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
        return n_idx <= m_idx

    return causal


def methods(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bm_s2, block: int, skip: set) -> dict:
    """name -> (forward returning out [B, S, Hq, D], tensors needing grad, sparse?) for FA4 dense (``fa4``) and
    FA4 block-sparse with ``bm_s2`` (a FlexAttention BlockMask of the S2 pattern, per q head; ``fa4_s2``)."""
    why = available()
    if why is not None:
        if not _WHY:
            _WHY.append(why)
            log.warning("FlashAttention-4 peer skipped: %s", why)
        return {}
    from flash_attn.cute import flash_attn_func
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    m: dict = {}
    if "fa4" not in skip:
        m["fa4"] = (lambda: flash_attn_func(q, k, v, causal=True)[0], [q, k, v], False)
    if "fa4_s2" not in skip and bm_s2 is not None:
        c = lambda t: None if t is None else t.to(torch.int32).contiguous()  # noqa: E731
        fwd = BlockSparseTensorsTorch(mask_block_cnt=c(bm_s2.kv_num_blocks), mask_block_idx=c(bm_s2.kv_indices),
                                      full_block_cnt=c(bm_s2.full_kv_num_blocks),
                                      full_block_idx=c(bm_s2.full_kv_indices), block_size=(block, block))
        bwd = BlockSparseTensorsTorch(mask_block_cnt=c(bm_s2.q_num_blocks), mask_block_idx=c(bm_s2.q_indices),
                                      full_block_cnt=c(bm_s2.full_q_num_blocks),
                                      full_block_idx=c(bm_s2.full_q_indices), block_size=(block, block))
        mask_mod = _causal_mask_mod()
        m["fa4_s2"] = (lambda: flash_attn_func(q, k, v, mask_mod=mask_mod, block_sparse_tensors=fwd,
                                               block_sparse_tensors_bwd=bwd)[0], [q, k, v], True)
    return m
