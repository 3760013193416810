"""Registry entries 'ring', 'ulysses', 'hybrid': context-parallel softmax attention dispatched on ``ctx.parallel``.

``ctx.parallel`` is the :class:`~longreach.parallel.plan.CPAttnInfo` the shard plan built for this batch; its
``strategy`` must match the registry name (the plan is the authority on the layout, the name is the user's
statement of intent; a mismatch is a configuration error, not something to guess about). With
``ctx.parallel=None`` (one rank, e.g. the CP=1 baseline run) the same code runs on the whole row with the
document mask from ``ctx.cu_seqlens``, so CP=1 and CP=k share every numerical step.
"""

from __future__ import annotations

import torch

from ..attention.context import AttnContext
from ..attention.registry import register
from .hybrid import cp_attention
from .plan import CPAttnInfo, single_rank_info


def _run(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext, options: dict) -> torch.Tensor:
    if options:
        raise ValueError(f"attention {name!r} takes no model.attention_options; got {sorted(options)}")
    info = ctx.parallel
    if info is None:
        b, s = q.shape[:2]
        info = single_rank_info(batch_size=b, seq_len=s, cu_seqlens=ctx.cu_seqlens)
    elif not isinstance(info, CPAttnInfo):
        raise TypeError(f"attention {name!r} needs ctx.parallel built by longreach.parallel.plan (CPAttnInfo), "
                        f"got {type(info).__name__}")
    elif info.strategy != name:
        raise ValueError(f"model.attention={name!r} but the batch was sharded for parallel.strategy="
                         f"{info.strategy!r}; set model.attention={info.strategy!r}")
    return cp_attention(q, k, v, info=info, causal=ctx.causal, scale=ctx.scale)


@register("ring")
def ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ctx: AttnContext, **options) -> torch.Tensor:
    """Zigzag ring attention. q [B, S_local, Hq, D], k/v [B, S_local, Hkv, D] -> [B, S_local, Hq, D]."""
    return _run("ring", q, k, v, ctx, options)


@register("ulysses")
def ulysses(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ctx: AttnContext, **options) -> torch.Tensor:
    """Ulysses (all-to-all) attention. Shapes as 'ring'."""
    return _run("ulysses", q, k, v, ctx, options)


@register("hybrid")
def hybrid(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ctx: AttnContext, **options) -> torch.Tensor:
    """Ulysses within sub-groups x ring across them. Shapes as 'ring'."""
    return _run("hybrid", q, k, v, ctx, options)
