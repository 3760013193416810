"""Chunked causal linear attention with state in/out: the public entry point.

``linear_attention`` runs the Triton kernel on CUDA tensors (and on CPU under ``TRITON_INTERPRET=1``, for
tests) and the plain-torch chunked reference otherwise. See ``reference.py`` for the maths and shapes.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .reference import (LinearAttnOut, linear_attention_chunked, linear_attention_quadratic,
                        linear_attention_recurrent, recurrent_step)

__all__ = ["LinearAttnOut", "linear_attention", "linear_attention_chunked", "linear_attention_quadratic",
           "linear_attention_recurrent", "recurrent_step", "use_triton"]


def use_triton(x: torch.Tensor) -> bool:
    """True when ``x`` goes through the Triton kernel: CUDA, or CPU under the Triton interpreter (fp64 never:
    the kernel accumulates in fp32, fp64 is for exactness tests)."""
    if x.dtype == torch.float64:
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float = 1.0,
                     initial_state: Optional[torch.Tensor] = None, initial_z: Optional[torch.Tensor] = None,
                     with_den: bool = False, output_final_state: bool = False) -> LinearAttnOut:
    """Causal linear attention numerator (and denominator), differentiable in every tensor argument.

    q [B, T, Hq, K] (feature-mapped queries), k [B, T, Hkv, K], v [B, T, Hkv, V]; initial_state
    [B, Hkv, K, V], initial_z [B, Hkv, K]. Returns ``LinearAttnOut(o, den, state, z)``.
    """
    if use_triton(q):
        from .triton import chunk_linear_attention

        return chunk_linear_attention(q, k, v, scale=scale, initial_state=initial_state, initial_z=initial_z,
                                      with_den=with_den, output_final_state=output_final_state)
    return linear_attention_chunked(q, k, v, scale=scale, initial_state=initial_state, initial_z=initial_z,
                                    with_den=with_den, output_final_state=output_final_state)
