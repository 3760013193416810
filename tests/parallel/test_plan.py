"""The shard plan: zigzag layout, padding, exact unshard, labels/positions at shard boundaries, token counts."""

from __future__ import annotations

import pytest
import torch

from cp_reference import random_cu_seqlens
from longreach.data.batch import Batch
from longreach.parallel.mesh import split_cp
from longreach.parallel.plan import ShardPlan, padded_length


def _packed_batch(b, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu = random_cu_seqlens(b, s, g)
    ids = torch.randint(3, 100, (b, s), generator=g)
    flat_ids = ids.flatten()
    labels = torch.full((b * s,), -100)
    pos = torch.zeros(b * s, dtype=torch.long)
    for a, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        pos[a:e] = torch.arange(e - a)
        labels[a:e - 1] = flat_ids[a + 1:e]  # shifted within the document, before any sharding
    return Batch(ids, labels.view(b, s), pos.view(b, s), cu)


def _plans(b, s, ring, uly, cu):
    return [ShardPlan(batch_size=b, seq_len=s, ring=ring, ulysses=uly, ring_rank=r, ulysses_rank=u, cu_seqlens=cu)
            for r in range(ring) for u in range(uly)]


@pytest.mark.parametrize("ring,uly", [(1, 1), (2, 1), (3, 1), (4, 1), (1, 2), (1, 3), (2, 2), (3, 2)])
@pytest.mark.parametrize("s", [37, 48])
def test_shard_unshard_and_boundaries(ring, uly, s):
    b = 2
    batch = _packed_batch(b, s, seed=ring * 10 + uly)
    plans = _plans(b, s, ring, uly, batch.cu_seqlens)
    p0 = plans[0]
    assert p0.padded_len == padded_length(s, ring=ring, ulysses=uly) and p0.padded_len % (2 * ring * uly) == 0
    # every padded index exactly once; zigzag: slot r = chunks r and 2R-1-r
    allidx = torch.cat([p.index() for p in plans])
    assert torch.equal(allidx.sort().values, torch.arange(p0.padded_len))
    c = p0.chunk
    for r in range(ring):
        slot = torch.cat([p.index() for p in plans[r * uly:(r + 1) * uly]])
        assert torch.equal(slot, torch.cat([torch.arange(r * c, (r + 1) * c),
                                            torch.arange((2 * ring - 1 - r) * c, (2 * ring - r) * c)]))
    locals_ = [p.shard_batch(batch, pad_id=0) for p in plans]
    for name in ("input_ids", "labels", "position_ids"):
        back = p0.unshard([getattr(lb, name) for lb in locals_])
        assert torch.equal(back, getattr(batch, name)), name
    # boundary tokens of every local chunk: label is the global next token of the same document, position is global
    for p, lb in zip(plans, locals_):
        idx = p.index()
        edges = sorted({0, len(idx) - 1} | {i for i in range(1, len(idx)) if idx[i] != idx[i - 1] + 1}
                       | {i - 1 for i in range(1, len(idx)) if idx[i] != idx[i - 1] + 1})
        for i in edges:
            t = int(idx[i])
            if t >= s:  # pad: out of the loss
                assert (lb.labels[:, i] == -100).all() and (lb.input_ids[:, i] == 0).all()
                continue
            assert torch.equal(lb.labels[:, i], batch.labels[:, t]) and torch.equal(lb.position_ids[:, i], batch.position_ids[:, t])
            for row in range(b):
                same_doc_next = t + 1 < s and batch.position_ids[row, t + 1] == batch.position_ids[row, t] + 1
                want = int(batch.input_ids[row, t + 1]) if same_doc_next else -100
                assert int(lb.labels[row, i]) == want, (row, t)
    assert sum(lb.num_tokens for lb in locals_) == batch.num_tokens


def test_zigzag_balances_causal_work():
    ring, s = 4, 64
    plans = _plans(1, s, ring, 1, None)
    work = []
    for p in plans:
        idx = p.index()
        work.append(int((idx[:, None] >= torch.arange(s)[None]).sum()))  # visible (q, k) pairs
    assert len(set(work)) == 1, work


def test_pad_tokens_are_their_own_document():
    p = ShardPlan(batch_size=1, seq_len=37, ring=2, ulysses=1, ring_rank=0, ulysses_rank=0, cu_seqlens=None)
    assert p.pad == 3 and p.doc_ids is not None
    assert (p.doc_ids[0, :37] == 0).all() and (p.doc_ids[0, 37:] == 1).all()


def test_bad_inputs_name_the_fix():
    with pytest.raises(ValueError, match="every row with a new document"):
        ShardPlan(batch_size=2, seq_len=8, ring=2, ulysses=1, ring_rank=0, ulysses_rank=0,
                  cu_seqlens=torch.tensor([0, 5, 16], dtype=torch.int32))
    p = ShardPlan(batch_size=1, seq_len=8, ring=2, ulysses=1, ring_rank=0, ulysses_rank=0)
    with pytest.raises(ValueError, match="plan was built for 8"):
        p.shard(torch.zeros(1, 9))
    with pytest.raises(ValueError, match="parallel.ulysses"):
        split_cp(cp=4, ulysses=3, strategy="hybrid")
    with pytest.raises(ValueError, match="parallel.ulysses == parallel.cp"):
        split_cp(cp=4, ulysses=2, strategy="ulysses")
    with pytest.raises(ValueError, match="parallel.strategy"):
        split_cp(cp=4, ulysses=1, strategy="stripe")
