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

Packed documents (``doc_ids``, global per-token document ids, the same on every rank): a document may span
chunks and ranks. Each chunk is cut into pieces at document starts (per batch row); a piece that continues a
document from the previous chunk reads the W-token prefix (only that document's tokens) and the incoming state;
a piece starting a document reads neither. A chunk's state contribution is that of its last piece, and the scan
is a combine with a reset flag: ``S_end(c) = dS_c + (no document starts in c) * S_end(c-1)``; the state entering c
is ``S_end(c-1)`` where c's first token continues the document of c-1's last token, else zero. The reset flags
are known on every rank from ``doc_ids``, so nothing but states and tails travels.

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
    all_chunk_ids: Optional[tuple] = None
    """``chunk_ids`` of every rank in group-rank order (None: gathered on every call)."""
    doc_ids: Optional[torch.Tensor] = None
    """int64 [B, num_chunks * L] global document id of every token, or None (one document per row)."""


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


@dataclass(frozen=True)
class _Piece:
    """A run of tokens of one chunk that one document covers, for a set of batch rows."""

    rows: slice
    a: int
    e: int
    """Token range inside the chunk."""
    prefix: int
    """Tokens of the same document just before the chunk (from earlier chunks' tails), <= window."""
    carry: bool
    """The piece continues the document of the previous chunk's last token: it adds the incoming state."""
    last: bool
    """The piece ends the chunk: its state is the chunk's contribution to the scan."""


def _doc_layout(doc_ids: Optional[torch.Tensor], *, batch: int, num_chunks: int, length: int, window: int):
    """Per chunk: its pieces, and [B] bool flags ``reset`` (a document starts in the chunk) and ``carry`` (its first
    token continues the previous chunk's document). Without ``doc_ids``: one piece per chunk over all rows."""
    if doc_ids is None:
        pieces = [[_Piece(slice(0, batch), 0, length, min(window, c * length), c > 0, True)]
                  for c in range(num_chunks)]
        reset = torch.zeros(num_chunks, batch, dtype=torch.bool)
        reset[0] = True
        return pieces, reset, ~reset
    if tuple(doc_ids.shape) != (batch, num_chunks * length):
        raise ValueError(f"doc_ids has shape {tuple(doc_ids.shape)}, expected (B, num_chunks * chunk) = "
                         f"({batch}, {num_chunks * length})")
    doc = doc_ids.detach().cpu()
    start = torch.ones_like(doc, dtype=torch.bool)
    start[:, 1:] = doc[:, 1:] != doc[:, :-1]  # a document starts where the id changes
    reset = start.view(batch, num_chunks, length).any(-1).T.contiguous()  # [num_chunks, B]
    carry = ~start[:, ::length].T  # [num_chunks, B]
    starts = [torch.nonzero(start[b]).flatten().tolist() for b in range(batch)]
    pieces = []
    for c in range(num_chunks):
        lo, hi = c * length, (c + 1) * length
        ps = []
        for b in range(batch):
            inner = [t - lo for t in starts[b] if lo < t < hi]
            bounds = [0, *inner, length]
            doc_start = max(t for t in starts[b] if t <= lo)
            for i, (a, e) in enumerate(zip(bounds[:-1], bounds[1:])):
                first = i == 0 and bool(carry[c, b])
                ps.append(_Piece(slice(b, b + 1), a, e, min(window, lo - doc_start) if first else 0, first,
                                 i == len(bounds) - 2))
        pieces.append(ps)
    return pieces, reset, carry


def hybrid_attention_cp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor, *,
                        window: int, scale: float, eps: float, group: dist.ProcessGroup,
                        chunk_ids: Sequence[int], num_chunks: int, all_chunk_ids: Optional[Sequence] = None,
                        doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Context-parallel hybrid (window > 0) or plain (window = 0) normalised linear attention.

    q [B, S_local, Hq, D], k/v [B, S_local, Hkv, D], fq [B, S_local, Hq, F], fk [B, S_local, Hkv, F]: this
    rank's chunks concatenated in ``chunk_ids`` order. ``all_chunk_ids``: every rank's ``chunk_ids`` in group-rank
    order (None: gathered). ``doc_ids`` int64 [B, num_chunks * S_local / len(chunk_ids)]: global document id of
    every token (the same on every rank; None: one document per row). Returns out [B, S_local, Hq, V] in q's
    dtype, equal to the single-process result on the unsharded sequence (documents run separately).
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
    if all_chunk_ids is None:
        order = _chunk_order(chunk_ids, group=group, device=q.device)
    else:
        order = [int(c) for ids in all_chunk_ids for c in ids]
        me = dist.get_rank(group)
        if len(all_chunk_ids) != world or tuple(all_chunk_ids[me]) != tuple(chunk_ids):
            raise ValueError(f"all_chunk_ids={all_chunk_ids} does not list chunk_ids={tuple(chunk_ids)} at this "
                             f"rank's position {me} in a group of {world}")
    if sorted(order) != list(range(num_chunks)):
        raise ValueError(f"chunk ids over the group {order} are not a permutation of 0..{num_chunks - 1}")
    slot_of = {c: i for i, c in enumerate(order)}
    b = q.shape[0]
    pieces, reset, carry = _doc_layout(doc_ids, batch=b, num_chunks=num_chunks, length=length, window=window)
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
        # (the rank holding only chunk 0, or only document starts): a zero-valued dependency keeps the
        # collectives paired
        anchor = gathered.sum() * 0.0

    def prefix(c: int, which: int, p: _Piece) -> Optional[torch.Tensor]:
        # the p.prefix tokens before global chunk c (same document), from the tails of chunks c-1, c-2, ...
        if tails is None or p.prefix == 0:
            return None
        need = -(-p.prefix // tails[which].shape[2])
        parts_ = [tails[which][slot_of[j]][p.rows] for j in range(c - need, c)]
        return torch.cat(parts_, dim=1)[:, -p.prefix:]

    parts = []  # per local chunk: [(piece, HybridParts)]
    for j, c in enumerate(chunk_ids):
        parts.append([(p, hybrid_parts(*(x[j][p.rows, p.a:p.e] for x in (qs, ks, vs, fqs, fks)), window=window,
                                       scale=scale, prefix_k=prefix(c, 0, p), prefix_v=prefix(c, 1, p),
                                       prefix_fk=prefix(c, 2, p), output_final_state=p.last))
                      for p in pieces[c]])
    # per-chunk state contributions (the last piece of every row), [S | z] side by side in one all-gather (one
    # collective, so the backward's all-reduces pair up in the same order on every rank):
    # [num_chunks, B, Hkv, F, V + 1], then global order
    st = torch.stack([torch.cat([torch.cat([hp.state, hp.z[..., None]], dim=-1) for p, hp in ps if p.last])
                      for ps in parts])
    sz = all_gather_autograd(st, group=group).flatten(0, 1)
    # as for the tails: a rank whose chunks carry no incoming state (only chunk 0, only document starts) must
    # still run this gather's backward
    state_anchor = sz.sum() * 0.0
    sz = sz[torch.tensor([slot_of[c] for c in range(num_chunks)], device=q.device)]
    # scan with resets: S_end(c) = dS_c + keep_c * S_end(c-1); sequential over the (few) chunks, exact
    keep = (~reset).to(device=q.device, dtype=sz.dtype)[..., None, None, None]  # [num_chunks, B, 1, 1, 1]
    take = carry.to(device=q.device, dtype=sz.dtype)[..., None, None, None]
    s_in, end = [], None
    for c in range(num_chunks):
        s_in.append(sz[c] * 0.0 if end is None else end * take[c])  # state entering c (its first piece)
        end = sz[c] if end is None else sz[c] + keep[c] * end
    hkv = k.shape[2]
    outs = []
    for j, c in enumerate(chunk_ids):
        rows = []  # outputs per row range, pieces in token order
        for p, hp in parts[j]:
            num, den = hp.num, hp.den
            if p.carry:
                bb, l, hq, f = num.shape[0], num.shape[1], fqs[j].shape[2], fqs[j].shape[3]
                fqg = fqs[j][p.rows, p.a:p.e].to(num.dtype).view(bb, l, hkv, hq // hkv, f)
                inc = s_in[c][p.rows].to(num.dtype)
                num = num + torch.einsum("blhgf,bhfv->blhgv", fqg, inc[..., :-1]).reshape(bb, l, hq, -1)
                den = den + torch.einsum("blhgf,bhf->blhg", fqg, inc[..., -1]).reshape(bb, l, hq)
            o = num / (den[..., None] + eps)
            if rows and rows[-1][0] == p.rows:
                rows[-1][1].append(o)
            else:
                rows.append((p.rows, [o]))
        outs.append(torch.cat([torch.cat(os_, dim=1) for _, os_ in rows], dim=0))
    out = torch.cat(outs, dim=1) + state_anchor
    if anchor is not None:
        out = out + anchor
    return out.to(q.dtype)
