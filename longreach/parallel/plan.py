"""The shard plan: the one object that owns how every sequence-dimension tensor is split across the CP group.

Layout (global token index ``t`` in a row padded to ``S_pad``, a multiple of ``2 * ring * ulysses``):

* zigzag over the ring: the row is cut into ``2R`` chunks of ``c = S_pad / 2R`` tokens; ring slot ``r`` owns
  chunks ``r`` and ``2R-1-r`` (in that order), so every slot gets the same share of the causal triangle;
* Ulysses inside a slot: the slot's ``2c`` tokens are split contiguously into ``U`` pieces; CP rank
  ``(r, u)`` (``cp_rank = r * U + u``) holds piece ``u`` of slot ``r``. After Ulysses' all-to-all the ``U`` ranks
  of a sub-group each hold the whole slot with ``H/U`` heads, which is exactly what the ring then works on.
  Pure ring is ``U = 1``; pure Ulysses is ``R = 1`` (slot 0 is the whole row, split contiguously).

Packed documents, two layouts (``layout=``):

* ``'global'``: the row is zigzagged as a whole; every token carries its global index and its document id
  (from ``cu_seqlens``). Balanced for one document per row, but a row of packed documents is not: a short
  document that lands in an early chunk costs its slot little, one in a late chunk a lot.
* ``'per_doc'`` (used only when ``cu_seqlens`` is given and the ring has more than one slot; otherwise the
  layout is ``'global'``): every document is cut into ``2R`` chunks and ring slot ``r`` takes chunks ``r`` and ``2R-1-r``
  of every document, so every slot gets the same share of every document's causal triangle. No per-document
  padding: a document of ``n = 2R q + m`` tokens gets chunks of ``q`` or ``q + 1`` tokens, its ``m`` extra
  tokens going to chunk indices taken round-robin over the ring slots (a pointer that continues from
  document to document; ``_per_doc_perm``), so every chunk index collects the same number of tokens over the
  row to within one; the row's pad tops each up to ``c = S_pad / 2R``. The row is thereby permuted into a
  *virtual* row whose chunk ``a`` (``c`` tokens) is "chunk ``a`` of every document, in document order, then pad",
  and the plain zigzag of the virtual row is the per-document zigzag of the real one. Attention masks use
  *virtual* positions (``slot_pos`` keeps its meaning and shape, the same for every row): for two tokens of one
  document, the one in the earlier chunk has the smaller virtual position, and inside one chunk the order is the
  real order, so ``pos[j] <= pos[i]`` is exactly the causal mask. Only the per-row permutation
  (:meth:`token_index`) differs between rows, and only shard/unshard see it. Per-token cost of the layout: the
  shard is a per-row gather.

In both layouts attention of query ``i`` to key ``j`` is allowed iff ``doc[j] == doc[i]`` and
``pos[j] <= pos[i]`` (causal). A ring step needs the ids/positions of the visiting KV slot: every rank derives
them from this plan (all CP ranks see the same global batch), so nothing but K and V travels. Blocks whose key
chunk lies wholly after the query chunk, or shares no document with it, are skipped (both tests only ever drop
fully masked blocks: disjoint doc-id ranges share no id, and positions are the mask's own).

Linear (state-passing) layers under the same plan: the padded row is also cut into ``2 * cp`` equal "linear
chunks" of ``e = S_pad / (2 R U)`` tokens; every CP rank holds exactly two of them (its local tokens are whole
chunks: zigzag slot chunk ``c = U e`` splits into ``U`` of them, piece ``u`` takes entries ``2u, 2u+1`` of the
slot's list). Linear layers state-pass over the whole CP group (ring x ulysses, whatever the softmax strategy) in
that chunk order (``CPAttnInfo.group / chunk_ids / num_chunks``); they never use the Ulysses all-to-all, since a
state scan needs no heads exchange. Packed documents reach them as ``CPAttnInfo.doc_ids`` (global, per token).
The state scan needs each chunk to be a contiguous stretch of the real row; the ``'per_doc'`` layout breaks
that (virtual chunk ``a`` interleaves pieces of every document), so a plan with ``layout='per_doc'`` builds no
linear fields (a 'linear' layer refuses to run) and models with linear layers use ``'global'``
(:func:`~longreach.parallel.setup.setup_parallel` decides).

Padding: a row whose length does not divide is padded at the end (input ``pad_id``, label -100, position 0, its
own document; under ``'per_doc'`` the pad tokens are spread over the virtual chunks), so the pad is out of the
loss and invisible to real tokens. ``unshard`` is the exact inverse of ``shard`` and drops the pad. Labels arrive
already shifted (``Batch`` contract), so sharding never needs a neighbour's token; the loss is normalised by
:attr:`ShardPlan.num_tokens`, the global real-token count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

log = logging.getLogger(__name__)

LAYOUTS = ("global", "per_doc")
"""Shard layouts (module docstring): one zigzag over the row, or one per packed document."""


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
    layout: str = "global"
    """The plan's layout ('global' | 'per_doc'); the linear fields above are None under 'per_doc'."""
    block_cache: dict = field(default_factory=dict, compare=False, repr=False)
    """The ring's kernel segments per (query slot, key slot, sub-block), built on first use (``kernel_block.py``)."""


def _zigzag_slot(r: int, ring: int, chunk: int) -> torch.Tensor:
    a = torch.arange(r * chunk, (r + 1) * chunk)
    b = torch.arange((2 * ring - 1 - r) * chunk, (2 * ring - r) * chunk)
    return torch.cat([a, b])


def _per_doc_perm(lengths: list[list[int]], *, ring: int, padded_len: int) -> torch.Tensor:
    """int64 [B, S_pad]: ``perm[b, v]`` = real (padded-row) index of the token at virtual position ``v`` of the
    per-document zigzag (module docstring). ``lengths``: the real documents of each row, no pad."""
    n = 2 * ring
    c = padded_len // n
    # extra tokens go round-robin over the slots (the early chunks 0..R-1, then the late ones of slot 0, 1, ...),
    # so no slot collects a second extra before every slot has one: that keeps the +-1-token granularity of the
    # chunks from piling up on one slot (measured: spread of per-slot causal work within ~3% on packed batches)
    order = list(range(ring)) + list(range(n - 1, ring - 1, -1))
    rows = []
    for docs in lengths:
        pieces: list[list[torch.Tensor]] = [[] for _ in range(n)]  # virtual chunk a -> real index ranges
        start, ptr = 0, 0  # ptr: next entry of `order` to receive an extra token (continues across documents)
        for length in docs:
            q, m = divmod(length, n)
            extra = {order[(ptr + i) % n] for i in range(m)}
            sizes = [q + (a in extra) for a in range(n)]
            ptr = (ptr + m) % n
            for a in range(n):
                pieces[a].append(torch.arange(start, start + sizes[a]))
                start += sizes[a]
        pad = start  # the row's pad (and nothing else) tops every chunk up to c tokens
        for a in range(n):
            used = sum(len(t) for t in pieces[a])
            # the round-robin pointer keeps every chunk's count within one of the others, so this cannot fail
            assert used <= c, (used, c)
            pieces[a].append(torch.arange(pad, pad + c - used))
            pad += c - used
        assert pad == padded_len, (pad, padded_len)
        rows.append(torch.cat([t for chunk in pieces for t in chunk]))
    return torch.stack(rows)


def _take(x: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` [B, ..., S, ...] gathered along ``dim`` with per-row indices ``idx`` [B, L] (rows are dim 0)."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = idx.shape
    size = list(x.shape)
    size[dim] = idx.shape[1]
    return x.gather(dim, idx.view(shape).expand(size))


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
        layout: 'global' (one zigzag over the row) or 'per_doc' (zigzag per document; module docstring). Without
            ``cu_seqlens`` the row is one document and the layout is 'global' either way (see :attr:`layout`).
    """

    def __init__(self, *, batch_size: int, seq_len: int, ring: int, ulysses: int, ring_rank: int, ulysses_rank: int,
                 cu_seqlens: Optional[torch.Tensor] = None, layout: str = "global"):
        if not (0 <= ring_rank < ring and 0 <= ulysses_rank < ulysses):
            raise ValueError(f"rank coordinates ({ring_rank}, {ulysses_rank}) outside the mesh ({ring}, {ulysses})")
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r} is not a shard layout; use one of {LAYOUTS}")
        # one ring slot: nothing to balance, and 'global' keeps each document contiguous in the slot (one kernel
        # segment per document, so the ring's diagonal step is one kernel call)
        self.layout = layout if cu_seqlens is not None and ring > 1 else "global"
        self.batch_size, self.seq_len = batch_size, seq_len
        self.ring, self.ulysses = ring, ulysses
        self.ring_rank, self.ulysses_rank = ring_rank, ulysses_rank
        self.padded_len = padded_length(seq_len, ring=ring, ulysses=ulysses)
        self.pad = self.padded_len - seq_len
        self.chunk = self.padded_len // (2 * ring)
        self.local_len = self.padded_len // (ring * ulysses)
        self.slot_pos = torch.stack([_zigzag_slot(r, ring, self.chunk) for r in range(ring)])  # [R, 2c]
        lengths = self._row_lengths(cu_seqlens)  # real documents per row, no pad
        self.doc_ids = self._doc_ids(lengths, packed=cu_seqlens is not None)  # [B, S_pad] real order, or None
        self.perm: Optional[torch.Tensor] = None  # [B, S_pad] virtual -> real index (None: identity, 'global')
        if self.layout == "per_doc":
            self.perm = _per_doc_perm(lengths, ring=ring, padded_len=self.padded_len)

    @property
    def cp(self) -> int:
        return self.ring * self.ulysses

    def _row_lengths(self, cu: Optional[torch.Tensor]) -> list[list[int]]:
        """Lengths of the (non-empty) documents of every row, checked against the batch shape."""
        b, s = self.batch_size, self.seq_len
        if cu is None:
            return [[s] for _ in range(b)]
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
        return lengths

    def _doc_ids(self, lengths: list[list[int]], *, packed: bool) -> Optional[torch.Tensor]:
        if not packed and self.pad == 0:
            return None
        # pad is a document of its own at the end of each row; ids rise along the flattened order
        flat = [n for row in lengths for n in (row + ([self.pad] if self.pad else []))]
        ids = torch.repeat_interleave(torch.arange(len(flat)), torch.tensor(flat))
        return ids.view(self.batch_size, self.padded_len)

    def index(self, ring_rank: Optional[int] = None, ulysses_rank: Optional[int] = None) -> torch.Tensor:
        """int64 [S_local]: layout position (the attention's ``slot_pos``) of each local token of rank
        (ring_rank, ulysses_rank). Under 'global' this is the token's index in the padded row; under 'per_doc'
        it is its virtual position (the real index, per row, is :meth:`token_index`)."""
        r = self.ring_rank if ring_rank is None else ring_rank
        u = self.ulysses_rank if ulysses_rank is None else ulysses_rank
        return self.slot_pos[r, u * self.local_len:(u + 1) * self.local_len]

    def token_index(self, ring_rank: Optional[int] = None, ulysses_rank: Optional[int] = None) -> torch.Tensor:
        """int64 [B, S_local]: index in the padded row of each local token of rank (ring_rank, ulysses_rank),
        per row (indices >= ``seq_len`` are pad)."""
        idx = self.index(ring_rank, ulysses_rank)
        if self.perm is None:
            return idx.expand(self.batch_size, -1)
        return self.perm[:, idx]

    def layout_doc_ids(self) -> Optional[torch.Tensor]:
        """int64 [B, S_pad]: document id of the token at each layout position (the real order under 'global'),
        or None for one document per row and no pad."""
        if self.doc_ids is None or self.perm is None:
            return self.doc_ids
        return self.doc_ids.gather(1, self.perm)

    @property
    def num_linear_chunks(self) -> int:
        return 2 * self.cp

    def linear_chunk_ids(self, ring_rank: Optional[int] = None, ulysses_rank: Optional[int] = None) -> tuple:
        """Global ids of the linear chunks (``S_pad / (2 cp)`` tokens each) rank (ring_rank, ulysses_rank) holds,
        in its local order. Only the 'global' layout has them (module docstring)."""
        if self.layout != "global":
            raise ValueError(f"linear (state-passing) chunks need the 'global' layout, this plan is {self.layout!r}; "
                             "build the plan (make_shard_fn) with layout='global' for models with 'linear' layers")
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
        if self.perm is None:
            return x.index_select(dim, self.index().to(x.device))
        self._check_rows(x, dim)
        return _take(x, self.token_index().to(x.device), dim)

    def _check_rows(self, x: torch.Tensor, dim: int) -> None:
        # the per-document layout permutes each row its own way: rows must be dim 0 and match the plan
        if dim % x.dim() == 0 or x.shape[0] != self.batch_size:
            raise ValueError(f"layout='per_doc' shards row by row: the tensor needs its {self.batch_size} rows at dim "
                             f"0 and the sequence at another dim; got shape {tuple(x.shape)}, dim={dim}")

    def unshard(self, parts: Sequence[torch.Tensor], *, dim: int = 1) -> torch.Tensor:
        """Exact inverse of :meth:`shard`: the local tensors of all CP ranks (indexed by ``cp_rank = r * U + u``)
        -> the global [B, S, ...] tensor, pad dropped."""
        if len(parts) != self.cp:
            raise ValueError(f"unshard needs {self.cp} parts (one per CP rank), got {len(parts)}")
        cat = torch.cat(list(parts), dim=dim)
        out = cat.new_empty(cat.shape)
        if self.perm is None:
            idx = torch.cat([self.index(r, u) for r in range(self.ring) for u in range(self.ulysses)])
            out.index_copy_(dim, idx.to(cat.device), cat)
        else:
            self._check_rows(cat, dim)
            idx = torch.cat([self.token_index(r, u) for r in range(self.ring) for u in range(self.ulysses)], dim=1)
            shape = [1] * cat.dim()
            shape[0], shape[dim] = idx.shape
            out.scatter_(dim, idx.to(cat.device).view(shape).expand(cat.shape), cat)
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
        doc = self.layout_doc_ids()
        if doc is not None:
            slot_doc = torch.stack([doc[:, p] for p in self.slot_pos])  # [R, B, 2c]
        common = dict(strategy=strategy, ring_size=self.ring, ulysses_size=self.ulysses, ring_rank=self.ring_rank,
                      ulysses_rank=self.ulysses_rank, ring_group=ring_group, ulysses_group=ulysses_group,
                      slot_pos=self.slot_pos, slot_doc=slot_doc, comm=comm, layout=self.layout)
        if self.layout != "global":  # no state-passing chunks in this layout: a 'linear' layer refuses to run
            return CPAttnInfo(**common)
        all_ids = tuple(self.linear_chunk_ids(r, u) for r in range(self.ring) for u in range(self.ulysses))
        return CPAttnInfo(**common, group=group, chunk_ids=all_ids[self.ring_rank * self.ulysses + self.ulysses_rank],
                          num_chunks=self.num_linear_chunks, all_chunk_ids=all_ids, doc_ids=self.doc_ids)


def single_rank_info(*, batch_size: int, seq_len: int, cu_seqlens: Optional[torch.Tensor], comm: Any = None) -> CPAttnInfo:
    """The degenerate layout (one slot = the whole row, no pad) used when a CP implementation runs on one rank."""
    doc = None
    if cu_seqlens is not None:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long().cpu()
        doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths).view(1, batch_size, seq_len)
    return CPAttnInfo(strategy="local", ring_size=1, ulysses_size=1, ring_rank=0, ulysses_rank=0, ring_group=None,
                      ulysses_group=None, slot_pos=torch.arange(seq_len)[None], slot_doc=doc, comm=comm)


def make_shard_fn(mesh, *, comm: Any = None, pad_id: int = 0, causal: bool = True, layout: str = "global"):
    """The trainer's hook: ``shard_fn(batch) -> (local_batch, AttnContext)`` for this rank of ``mesh``.

    ``layout``: 'per_doc' zigzags every packed document on its own (balanced causal work; softmax-only models),
    'global' zigzags the row (needed by 'linear' layers; the default, safe for every model).
    :func:`~longreach.parallel.setup.setup_parallel` picks it from the model's layers.

    Every CP rank of a data-parallel replica must be handed the same global ``batch``. A length that does not
    divide is padded (logged once per length). Normalise the loss with :func:`global_num_tokens` of the local
    batches, never with a per-rank mean.
    """
    from ..attention.context import AttnContext
    from .comm_count import Comm

    if layout not in LAYOUTS:
        raise ValueError(f"make_shard_fn(layout={layout!r}): use one of {LAYOUTS}")
    comm = Comm() if comm is None else comm
    logged: set[int] = set()  # lives in this closure (one per trainer), not in the module

    def shard_fn(batch):
        b, s = batch.input_ids.shape
        plan = ShardPlan(batch_size=b, seq_len=s, ring=mesh.ring, ulysses=mesh.ulysses, ring_rank=mesh.ring_rank,
                         ulysses_rank=mesh.ulysses_rank, cu_seqlens=batch.cu_seqlens, layout=layout)
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
