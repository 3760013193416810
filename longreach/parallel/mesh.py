"""The device mesh: data-parallel x ring x Ulysses, built once from config and passed down as an argument.

Rank layout (row-major over ``(dp, ring, ulysses)``): ``rank = (dp_idx * ring + ring_idx) * ulysses + uly_idx``.
Ulysses groups are the innermost, contiguous ranks, so on a multi-GPU node they share NVLink (all-to-all is
bandwidth-hungry); the ring crosses Ulysses sub-groups; the CP group is ring x ulysses; data parallel is outermost.

Who gets which group: attention uses ``ring_group`` / ``ulysses_group`` (through ``make_shard_fn``); the trainer
gets ``dp_group`` and ``cp_group`` (``Trainer(dp_group=mesh.dp_group, sp_group=mesh.cp_group, shard_fn=...)``) and
hands them to DeepSpeed as its data-parallel and sequence-parallel groups, so DeepSpeed reduces gradients and
partitions ZeRO state over its "sequence data parallel" group, dp x cp: CP ranks hold the same parameters and
compute partial gradients of the same loss. ``dp_cp_group`` is that group, for the global token count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

log = logging.getLogger(__name__)

STRATEGIES = ("ring", "ulysses", "hybrid")


def split_cp(*, cp: int, ulysses: int, strategy: str) -> tuple[int, int]:
    """(ring size, ulysses size) for a strategy, refusing inconsistent settings with the field to fix."""
    if strategy not in STRATEGIES:
        raise ValueError(f"parallel.strategy={strategy!r} is not one of {', '.join(STRATEGIES)}")
    if cp < 1 or ulysses < 1:
        raise ValueError(f"parallel.cp={cp} and parallel.ulysses={ulysses} must be >= 1")
    if strategy == "ring":
        if ulysses != 1:
            raise ValueError(f"parallel.ulysses={ulysses} is only used by parallel.strategy=ulysses or hybrid; set it to 1")
        return cp, 1
    if strategy == "ulysses":
        if ulysses not in (1, cp):
            raise ValueError(f"parallel.strategy=ulysses needs parallel.ulysses == parallel.cp (got {ulysses} and {cp})")
        return 1, cp
    if cp % ulysses:
        raise ValueError(f"parallel.strategy=hybrid needs parallel.ulysses={ulysses} to divide parallel.cp={cp}")
    return cp // ulysses, ulysses


@dataclass(frozen=True)
class Mesh:
    """This rank's coordinates and process groups. Built by :func:`build_mesh`; never global."""

    world_size: int
    rank: int
    dp: int
    """Data-parallel degree."""
    ring: int
    """Ring degree (ranks passing KV around)."""
    ulysses: int
    """Ulysses degree (ranks exchanging heads for sequence)."""
    strategy: str
    dp_rank: int
    ring_rank: int
    ulysses_rank: int
    dp_group: Optional[dist.ProcessGroup]
    """Ranks holding the same sequence position (same ring/ulysses coordinate), different data."""
    cp_group: Optional[dist.ProcessGroup]
    """Ranks sharing one sequence (ring x ulysses)."""
    ring_group: Optional[dist.ProcessGroup]
    ulysses_group: Optional[dist.ProcessGroup]
    dp_cp_group: Optional[dist.ProcessGroup]
    """All ranks holding the same parameters (dp x cp): gradient reduction and the global token count."""

    @property
    def cp(self) -> int:
        return self.ring * self.ulysses

    @property
    def cp_rank(self) -> int:
        return self.ring_rank * self.ulysses + self.ulysses_rank


def build_mesh(*, cp: int, ulysses: int, strategy: str, world_size: Optional[int] = None,
               rank: Optional[int] = None) -> Mesh:
    """Create every group of the mesh. Collective: all ranks of the default group call it with the same arguments
    (``dist.new_group`` must be entered by every rank for every group, in the same order)."""
    world_size = dist.get_world_size() if world_size is None else world_size
    rank = dist.get_rank() if rank is None else rank
    ring, uly = split_cp(cp=cp, ulysses=ulysses, strategy=strategy)
    if world_size % cp:
        raise ValueError(f"parallel.cp={cp} does not divide the world size {world_size}; launch a multiple of {cp} ranks")
    dp = world_size // cp

    def coords(r: int) -> tuple[int, int, int]:
        return r // cp, (r % cp) // uly, r % uly

    def make(key) -> Optional[dist.ProcessGroup]:
        # one group per distinct key value; every rank creates all of them, keeps its own
        mine = None
        for k in sorted({key(r) for r in range(world_size)}):
            ranks = [r for r in range(world_size) if key(r) == k]
            g = dist.new_group(ranks)
            if key(rank) == k:
                mine = g
        return mine

    d, ri, ui = coords(rank)
    mesh = Mesh(
        world_size=world_size, rank=rank, dp=dp, ring=ring, ulysses=uly, strategy=strategy,
        dp_rank=d, ring_rank=ri, ulysses_rank=ui,
        dp_group=make(lambda r: coords(r)[1:]),
        cp_group=make(lambda r: coords(r)[0]),
        ring_group=make(lambda r: (coords(r)[0], coords(r)[2])),
        ulysses_group=make(lambda r: coords(r)[:2]),
        dp_cp_group=make(lambda r: 0),
    )
    if rank == 0:
        log.info("mesh: world=%d dp=%d ring=%d ulysses=%d strategy=%s", world_size, dp, ring, uly, strategy)
    return mesh


def validate_parallel(*, cp: int, ulysses: int, strategy: str, world_size: int, num_heads: int, num_kv_heads: int,
                      seq_len: int) -> int:
    """Check ``parallel.*`` against the model and the launch before the first step; returns the padded sequence
    length (logged when it differs from ``seq_len``: the pad is masked out of the loss)."""
    from .plan import padded_length
    from .ulysses import check_heads

    ring, uly = split_cp(cp=cp, ulysses=ulysses, strategy=strategy)
    if world_size % cp:
        raise ValueError(f"parallel.cp={cp} does not divide the world size {world_size}; launch a multiple of {cp} "
                         f"ranks or set parallel.cp to a divisor of {world_size}")
    if num_heads % num_kv_heads:
        raise ValueError(f"the model's {num_heads} attention heads are not a multiple of its {num_kv_heads} KV heads")
    check_heads(num_heads=num_heads, num_kv_heads=num_kv_heads, ulysses=uly)
    if seq_len < 1:
        raise ValueError(f"data.seq_len={seq_len} must be > 0")
    padded = padded_length(seq_len, ring=ring, ulysses=uly)
    if padded != seq_len:
        log.info("data.seq_len=%d is not a multiple of 2*ring*ulysses=%d: each sequence is padded to %d tokens "
                 "(pad masked out of the loss); use data.seq_len=%d to avoid the pad", seq_len, 2 * ring * uly, padded,
                 padded)
    return padded
