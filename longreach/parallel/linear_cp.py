"""State-passing context parallelism for (hybrid) linear attention.

The global sequence is cut into ``num_chunks`` equal chunks; each rank holds some of them, concatenated
in its local order (``chunk_ids``: contiguous shards hold ``[rank]`` of ``world`` chunks, the zigzag plan
holds ``[r, 2W-1-r]`` of 2W). Linear attention is linear in its state, so for every local chunk c:

1. the window keys/values before c (the last W tokens of chunks c-1, c-2, ...) come from an all-gather
   of every chunk's tail (small: W tokens per chunk);
2. the chunk's local result (window softmax + shifted linear term from a zero state) and its own state
   contribution dS_c = sum phi(k'_j) v'_j^T, dz_c = sum phi(k'_j) are computed by the kernel;
3. every dS_c / dz_c is all-gathered; the state entering c is the exclusive prefix sum over chunks < c
   in global order (a prefix scan done locally on the gathered states);
4. the rank adds phi(q) . S_in to its numerator and phi(q) . z_in to its denominator, then divides.

The backward is the same graph in reverse: the all-gathers' backward all-reduces the state (and tail)
gradients and each rank keeps its own, so d(state) flows to the ranks that produced it. Collectives are
all_gather/all_reduce only, so gloo (CPU tests) and NCCL both work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ..kernels.linear_attention.hybrid import hybrid_parts


@dataclass(frozen=True)
class LinearCP:
    """What the linear strategy needs from the shard plan (built per batch; the plan fills it)."""

    group: dist.ProcessGroup
    """The context-parallel process group."""
    chunk_ids: tuple
    """Global chunk indices this rank holds, in local order (equal-length chunks)."""
    num_chunks: int
    """Chunks in the global sequence (world for contiguous shards, 2*world for zigzag)."""


class _AllGather(torch.autograd.Function):
    """all_gather along a new leading dim [world, ...]; backward all-reduces and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, x.contiguous(), group=group)
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None


def all_gather_autograd(x: torch.Tensor, *, group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable all-gather: x [...] -> [world, ...]."""
    return _AllGather.apply(x, group)


def _chunk_order(chunk_ids: Sequence[int], *, group: dist.ProcessGroup, device) -> list[int]:
    # the global chunk id of every gathered slot: slot r * n_local + j holds rank r's j-th local chunk
    ids = torch.tensor(list(chunk_ids), dtype=torch.long, device=device)
    out = [torch.empty_like(ids) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, ids, group=group)
    return torch.cat(out).tolist()


def hybrid_attention_cp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor, *,
                        window: int, scale: float, eps: float, group: dist.ProcessGroup,
                        chunk_ids: Sequence[int], num_chunks: int) -> torch.Tensor:
    """Context-parallel hybrid (window > 0) or plain (window = 0) normalised linear attention.

    q [B, S_local, Hq, D], k/v [B, S_local, Hkv, D], fq [B, S_local, Hq, F], fk [B, S_local, Hkv, F]: this
    rank's chunks concatenated in ``chunk_ids`` order. Returns out [B, S_local, Hq, V] in q's dtype, equal to
    the single-process result on the unsharded sequence.
    """
    n_local = len(chunk_ids)
    world = dist.get_world_size(group)
    s = q.shape[1]
    if n_local == 0 or s % n_local != 0:
        raise ValueError(f"local sequence length {s} is not divisible into {n_local} chunks (chunk_ids={list(chunk_ids)})")
    if n_local * world != num_chunks:
        raise ValueError(f"{world} ranks x {n_local} chunks each != num_chunks={num_chunks}; every rank must hold "
                         "the same number of chunks")
    length = s // n_local
    order = _chunk_order(chunk_ids, group=group, device=q.device)
    if sorted(order) != list(range(num_chunks)):
        raise ValueError(f"chunk ids over the group {order} are not a permutation of 0..{num_chunks - 1}")
    slot_of = {c: i for i, c in enumerate(order)}
    split = lambda x: list(x.split(length, dim=1))  # noqa: E731
    qs, ks, vs, fqs, fks = map(split, (q, k, v, fq, fk))

    tails = None
    anchor = None
    if window > 0:
        # the last min(W, L) tokens of every chunk (k | v | phi(k) side by side), one all-gather:
        # [num_chunks (slot order), B, tail, Hkv, D + V + F]
        tl_len = min(window, length)
        dims = [k.shape[3], v.shape[3], fk.shape[3]]
        tail = torch.stack([torch.cat([x[:, length - tl_len:].to(q.dtype) for x in xs], dim=-1)
                            for xs in zip(ks, vs, fks)])
        gathered = all_gather_autograd(tail, group=group).flatten(0, 1)
        tails = list(gathered.split(dims, dim=-1))
        # every rank must run this gather's backward (an all-reduce) even where no local chunk reads a tail
        # (the rank holding only chunk 0): a zero-valued dependency keeps the collectives paired
        anchor = gathered.sum() * 0.0

    def prefix(c: int, which: int) -> Optional[torch.Tensor]:
        # the W tokens before global chunk c, from the tails of chunks c-1, c-2, ... (fewer at the start)
        if tails is None or c == 0:
            return None
        need = -(-window // tails[which].shape[2])
        parts_ = [tails[which][slot_of[j]] for j in range(max(0, c - need), c)]
        return torch.cat(parts_, dim=1)[:, -window:]

    parts = []
    for j, c in enumerate(chunk_ids):
        parts.append(hybrid_parts(qs[j], ks[j], vs[j], fqs[j], fks[j], window=window, scale=scale,
                                  prefix_k=prefix(c, 0), prefix_v=prefix(c, 1), prefix_fk=prefix(c, 2),
                                  output_final_state=True))
    # per-chunk state contributions, [S | z] side by side in one all-gather (one collective, so the backward's
    # all-reduces pair up in the same order on every rank): [num_chunks, B, Hkv, F, V + 1], then global order
    st = torch.stack([torch.cat([p.state, p.z[..., None]], dim=-1) for p in parts])
    sz = all_gather_autograd(st, group=group).flatten(0, 1)
    perm = torch.tensor([slot_of[c] for c in range(num_chunks)], device=q.device)
    sz = sz[perm]
    ds, dz = sz[..., :-1], sz[..., -1]
    s_in = torch.cumsum(ds, 0) - ds  # exclusive prefix: state entering each chunk
    z_in = torch.cumsum(dz, 0) - dz
    hkv = k.shape[2]
    outs = []
    for j, c in enumerate(chunk_ids):
        p = parts[j]
        b, l, hq, f = fqs[j].shape
        fqg = fqs[j].to(p.num.dtype).view(b, l, hkv, hq // hkv, f)
        num = p.num + torch.einsum("blhgf,bhfv->blhgv", fqg, s_in[c].to(p.num.dtype)).reshape(b, l, hq, -1)
        den = p.den + torch.einsum("blhgf,bhf->blhg", fqg, z_in[c].to(p.num.dtype)).reshape(b, l, hq)
        outs.append(num / (den[..., None] + eps))
    out = torch.cat(outs, dim=1)
    if anchor is not None:
        out = out + anchor
    return out.to(q.dtype)
