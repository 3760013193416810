"""The shard plan: the one object that owns how every sequence-dimension tensor is split across the CP group.

Layout (global token index ``t`` in a row padded to ``S_pad``, a multiple of ``2 * ring * ulysses``):

* zigzag over the ring: the row is cut into ``2R`` chunks of ``c = S_pad / 2R`` tokens; ring slot ``r`` owns
  chunks ``r`` and ``2R-1-r`` (in that order), so every slot gets the same share of the causal triangle;
* Ulysses inside a slot: the slot's ``2c`` tokens are split contiguously into ``U`` pieces; CP rank
  ``(r, u)`` (``cp_rank = r * U + u``) holds piece ``u`` of slot ``r``. After Ulysses' all-to-all the ``U`` ranks
  of a sub-group each hold the whole slot with ``H/U`` heads, which is exactly what the ring then works on.
  Pure ring is ``U = 1``; pure Ulysses is ``R = 1`` (slot 0 is the whole row, split contiguously).

Packed documents: global zigzag with per-token masks. Documents are NOT re-chunked one by one; the row is
zigzagged as a whole and every token carries its global index and its document id (from ``cu_seqlens``).
Attention of query ``i`` to key ``j`` is allowed iff ``doc[j] == doc[i]`` and ``j <= i`` (causal). A ring step
needs the ids/indices of the visiting KV slot: every rank derives them from this plan (all CP ranks see the
same global batch), so nothing but K and V travels. Blocks whose key chunk lies wholly after the query chunk,
or shares no document with it, are skipped.

Linear (state-passing) layers under the same plan: the padded row is also cut into ``2 * cp`` equal "linear
chunks" of ``e = S_pad / (2 R U)`` tokens; every CP rank holds exactly two of them (its local tokens are whole
chunks: zigzag slot chunk ``c = U e`` splits into ``U`` of them, piece ``u`` takes entries ``2u, 2u+1`` of the
slot's list). Linear layers state-pass over the whole CP group (ring x ulysses, whatever the softmax strategy) in
that chunk order (``CPAttnInfo.group / chunk_ids / num_chunks``); they never use the Ulysses all-to-all, since a
state scan needs no heads exchange. Packed documents reach them as ``CPAttnInfo.doc_ids`` (global, per token).

Padding: a row whose length does not divide is padded at the end (input ``pad_id``, label -100, position 0,
its own document), so the pad is out of the loss and invisible to real tokens. ``unshard`` is the exact
inverse of ``shard`` and drops the pad. Labels arrive already shifted (``Batch`` contract), so sharding never
needs a neighbour's token; the loss is normalised by :attr:`ShardPlan.num_tokens`, the global real-token count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CPAttnInfo:
    """``AttnContext.parallel`` for the 'ring' / 'ulysses' / 'hybrid' implementations and for 'linear' layers
    (state passing; the last fields), all built by the plan so one model mixes them under one layout."""

    strategy: str
    """ring | ulysses | hybrid (or 'local' for the single-rank fallback)."""
    ring_size: int
    ulysses_size: int
    ring_rank: int
    ulysses_rank: int
    ring_group: Any
    """Process group of the ring (None when ring_size == 1)."""
    ulysses_group: Any
    """Process group of the Ulysses sub-group (None when ulysses_size == 1)."""
    slot_pos: torch.Tensor
    """int64 [R, 2c]: global token index of every token of every ring slot."""
    slot_doc: Optional[torch.Tensor]
    """int64 [R, B, 2c]: document id of those tokens, or None when there is one document per row and no pad."""
    comm: Any
    """The :class:`~longreach.parallel.comm_count.Comm` every collective goes through."""
    # ---- what 'linear' layers read (state passing over the whole CP group; None where no plan built them) ----
    group: Any = None
    """CP process group (ring x ulysses) over which the sequence is split; its rank order is ``cp_rank``."""
    chunk_ids: Optional[tuple] = None
    """Global linear-chunk ids of this rank's local tokens, in local order (two chunks of S_pad / num_chunks)."""
    num_chunks: Optional[int] = None
    """Linear chunks in the padded row (``2 * cp``)."""
    all_chunk_ids: Optional[tuple] = None
    """``chunk_ids`` of every CP rank, in group-rank (``cp_rank``) order: saves linear layers a gather."""
    doc_ids: Optional[torch.Tensor] = None
    """int64 [B, S_pad]: global document id of every token (pad = its own document), or None for one document
    per row and no pad. Same tensor on every CP rank."""


def _zigzag_slot(r: int, ring: int, chunk: int) -> torch.Tensor:
    a = torch.arange(r * chunk, (r + 1) * chunk)
    b = torch.arange((2 * ring - 1 - r) * chunk, (2 * ring - r) * chunk)
    return torch.cat([a, b])


def padded_length(seq_len: int, *, ring: int, ulysses: int) -> int:
    """Smallest length >= seq_len that the layout can split evenly (a multiple of 2 * ring * ulysses)."""
    m = 2 * ring * ulysses
    return -(-seq_len // m) * m


class ShardPlan:
    """How a global batch of shape [B, S] is split over a CP group of ``ring x ulysses`` ranks.

    Args:
        batch_size, seq_len: global batch shape (before padding).
        ring, ulysses: degrees; ``ring_rank``, ``ulysses_rank``: this rank's coordinates.
        cu_seqlens: int32 [n_docs+1] document boundaries over the flattened global [B*S] tokens, or None.
    """

    def __init__(self, *, batch_size: int, seq_len: int, ring: int, ulysses: int, ring_rank: int, ulysses_rank: int,
                 cu_seqlens: Optional[torch.Tensor] = None):
        if not (0 <= ring_rank < ring and 0 <= ulysses_rank < ulysses):
            raise ValueError(f"rank coordinates ({ring_rank}, {ulysses_rank}) outside the mesh ({ring}, {ulysses})")
        self.batch_size, self.seq_len = batch_size, seq_len
        self.ring, self.ulysses = ring, ulysses
        self.ring_rank, self.ulysses_rank = ring_rank, ulysses_rank
        self.padded_len = padded_length(seq_len, ring=ring, ulysses=ulysses)
        self.pad = self.padded_len - seq_len
        self.chunk = self.padded_len // (2 * ring)
        self.local_len = self.padded_len // (ring * ulysses)
        self.slot_pos = torch.stack([_zigzag_slot(r, ring, self.chunk) for r in range(ring)])  # [R, 2c]
        self.doc_ids = self._doc_ids(cu_seqlens)  # [B, S_pad] or None

    @property
    def cp(self) -> int:
        return self.ring * self.ulysses

    def _doc_ids(self, cu: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        b, s, sp = self.batch_size, self.seq_len, self.padded_len
        if cu is None:
            lengths = [[s] for _ in range(b)]
            if self.pad == 0:
                return None
        else:
            cu = [int(x) for x in cu.tolist()]
            if cu[0] != 0 or cu[-1] != b * s or any(e < a for a, e in zip(cu[:-1], cu[1:])):
                raise ValueError(f"cu_seqlens must rise from 0 to B*S={b * s}; got {cu[:4]}...{cu[-2:]}")
            bounds = set(cu)
            missing = [row for row in range(b) if row * s not in bounds]
            if missing:
                raise ValueError(f"cu_seqlens has a document crossing into row {missing[0]}; packing must start "
                                 "every row with a new document")
            lengths = [[] for _ in range(b)]
            for a, e in zip(cu[:-1], cu[1:]):
                if e > a:
                    lengths[a // s].append(e - a)
        # pad is a document of its own at the end of each row; ids rise along the flattened order
        flat = [n for row in lengths for n in (row + ([self.pad] if self.pad else []))]
        ids = torch.repeat_interleave(torch.arange(len(flat)), torch.tensor(flat))
        return ids.view(b, sp)

    def index(self, ring_rank: Optional[int] = None, ulysses_rank: Optional[int] = None) -> torch.Tensor:
        """int64 [S_local]: global (padded) token index of each local token of rank (ring_rank, ulysses_rank)."""
        r = self.ring_rank if ring_rank is None else ring_rank
        u = self.ulysses_rank if ulysses_rank is None else ulysses_rank
        return self.slot_pos[r, u * self.local_len:(u + 1) * self.local_len]

    @property
    def num_linear_chunks(self) -> int:
        return 2 * self.cp

    def linear_chunk_ids(self, ring_rank: Optional[int] = None, ulysses_rank: Optional[int] = None) -> tuple:
        """Global ids of the linear chunks (``S_pad / (2 cp)`` tokens each) rank (ring_rank, ulysses_rank) holds,
        in its local order."""
        idx = self.index(ring_rank, ulysses_rank)
        e = self.padded_len // self.num_linear_chunks
        ids = tuple(int(i) // e for i in idx[::e])
        # internal invariant of the layout: local tokens are whole chunks, each contiguous
        assert torch.equal(idx, torch.cat([torch.arange(c * e, (c + 1) * e) for c in ids])), ids
        return ids

    def shard(self, x: torch.Tensor, *, pad_value: Any = 0, dim: int = 1) -> torch.Tensor:
        """Global [B, S, ...] (sequence at ``dim``) -> this rank's [B, S_local, ...], padding with ``pad_value``."""
        if x.shape[dim] != self.seq_len:
            raise ValueError(f"tensor has {x.shape[dim]} tokens along dim {dim}, the plan was built for {self.seq_len}")
        if self.pad:
            shape = list(x.shape)
            shape[dim] = self.pad
            x = torch.cat([x, x.new_full(shape, pad_value)], dim=dim)
        return x.index_select(dim, self.index().to(x.device))

    def unshard(self, parts: Sequence[torch.Tensor], *, dim: int = 1) -> torch.Tensor:
        """Exact inverse of :meth:`shard`: the local tensors of all CP ranks (indexed by ``cp_rank = r * U + u``)
        -> the global [B, S, ...] tensor, pad dropped."""
        if len(parts) != self.cp:
            raise ValueError(f"unshard needs {self.cp} parts (one per CP rank), got {len(parts)}")
        idx = torch.cat([self.index(r, u) for r in range(self.ring) for u in range(self.ulysses)])
        cat = torch.cat(list(parts), dim=dim)
        shape = list(cat.shape)
        out = cat.new_empty(shape)
        out.index_copy_(dim, idx.to(cat.device), cat)
        return out.narrow(dim, 0, self.seq_len)

    def shard_batch(self, batch, *, pad_id: int = 0):
        """``Batch`` (global, labels already shifted) -> this rank's ``Batch`` (``cu_seqlens`` None: documents travel
        as ids in the attention info)."""
        from ..data.batch import Batch

        return Batch(
            input_ids=self.shard(batch.input_ids, pad_value=pad_id),
            labels=self.shard(batch.labels, pad_value=-100),
            position_ids=self.shard(batch.position_ids, pad_value=0),
            cu_seqlens=None,
        )

    def attn_info(self, *, strategy: str, ring_group: Any, ulysses_group: Any, comm: Any, group: Any = None
                  ) -> CPAttnInfo:
        """The ``AttnContext.parallel`` payload for this rank. ``group`` is the CP group (``mesh.cp_group``) that
        'linear' layers state-pass over; without it (softmax-only callers) a linear layer refuses to run."""
        slot_doc = None
        if self.doc_ids is not None:
            slot_doc = torch.stack([self.doc_ids[:, p] for p in self.slot_pos])  # [R, B, 2c]
        all_ids = tuple(self.linear_chunk_ids(r, u) for r in range(self.ring) for u in range(self.ulysses))
        return CPAttnInfo(strategy=strategy, ring_size=self.ring, ulysses_size=self.ulysses, ring_rank=self.ring_rank,
                          ulysses_rank=self.ulysses_rank, ring_group=ring_group, ulysses_group=ulysses_group,
                          slot_pos=self.slot_pos, slot_doc=slot_doc, comm=comm, group=group,
                          chunk_ids=all_ids[self.ring_rank * self.ulysses + self.ulysses_rank],
                          num_chunks=self.num_linear_chunks, all_chunk_ids=all_ids, doc_ids=self.doc_ids)


def single_rank_info(*, batch_size: int, seq_len: int, cu_seqlens: Optional[torch.Tensor], comm: Any = None) -> CPAttnInfo:
    """The degenerate layout (one slot = the whole row, no pad) used when a CP implementation runs on one rank."""
    doc = None
    if cu_seqlens is not None:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long().cpu()
        doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths).view(1, batch_size, seq_len)
    return CPAttnInfo(strategy="local", ring_size=1, ulysses_size=1, ring_rank=0, ulysses_rank=0, ring_group=None,
                      ulysses_group=None, slot_pos=torch.arange(seq_len)[None], slot_doc=doc, comm=comm)


def make_shard_fn(mesh, *, comm: Any = None, pad_id: int = 0, causal: bool = True):
    """The trainer's hook: ``shard_fn(batch) -> (local_batch, AttnContext)`` for this rank of ``mesh``.

    Every CP rank of a data-parallel replica must be handed the same global ``batch``. A length that does not
    divide is padded (logged once per length). Normalise the loss with :func:`global_num_tokens` of the local
    batches, never with a per-rank mean.
    """
    from ..attention.context import AttnContext
    from .comm_count import Comm

    comm = Comm() if comm is None else comm
    logged: set[int] = set()  # lives in this closure (one per trainer), not in the module

    def shard_fn(batch):
        b, s = batch.input_ids.shape
        plan = ShardPlan(batch_size=b, seq_len=s, ring=mesh.ring, ulysses=mesh.ulysses, ring_rank=mesh.ring_rank,
                         ulysses_rank=mesh.ulysses_rank, cu_seqlens=batch.cu_seqlens)
        if plan.pad and s not in logged:
            logged.add(s)
            log.info("sequence length %d does not divide into 2*ring*ulysses=%d pieces; padding to %d "
                     "(pad tokens are out of the loss and invisible to attention)",
                     s, 2 * mesh.ring * mesh.ulysses, plan.padded_len)
        info = plan.attn_info(strategy=mesh.strategy, ring_group=mesh.ring_group, ulysses_group=mesh.ulysses_group,
                              comm=comm, group=mesh.cp_group)
        return plan.shard_batch(batch, pad_id=pad_id), AttnContext(causal=causal, parallel=info)

    return shard_fn


def global_num_tokens(local_count: torch.Tensor | int, *, group: Any, device: Optional[torch.device] = None
                      ) -> torch.Tensor:
    """Sum of real (label != -100) tokens over ``group`` (the mesh's ``dp_cp_group``): the one loss denominator,
    so CP=k and CP=1 give the same loss. Returns a float64 scalar on ``device`` (default: the count's device;
    NCCL needs a CUDA tensor)."""
    import torch.distributed as dist

    n = torch.as_tensor(local_count, dtype=torch.float64, device=device).detach().clone().reshape(())
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(n, group=group)
    return n


def rank_loss(loss_sum: torch.Tensor, local_count: torch.Tensor | int, *, group: Any, grad_divisor: int = 1
              ) -> torch.Tensor:
    """This rank's share of the global token-mean loss: ``loss_sum * grad_divisor / global_num_tokens``.

    Summed over ``group`` (dp x cp) these shares are the mean over every real token of the global batch, for any
    CP degree. ``grad_divisor`` undoes what the gradient reduction divides by: 1 for a plain SUM all-reduce.
    Under DeepSpeed the divisor depends on the ZeRO stage; the Trainer computes it in one place
    (``launch.trainer.deepspeed_grad_divisor``) and does not call this helper.
    """
    n = global_num_tokens(local_count, group=group, device=loss_sum.device)
    return loss_sum * grad_divisor / n.to(loss_sum.dtype)
