"""The shard plan: zigzag layouts (global and per document), padding, exact unshard, labels/positions at shard
boundaries, token counts, causal balance, and the per-document masks/block skipping against the real mask."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cp_reference import random_cu_seqlens
from longreach.data.batch import Batch
from longreach.parallel.mesh import split_cp
from longreach.parallel.local import block_mask
from longreach.parallel.plan import ShardPlan, padded_length
from longreach.parallel.ring import block_pairs
from longreach.parallel.setup import shard_layout


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


def _plans(b, s, ring, uly, cu, layout="global"):
    return [ShardPlan(batch_size=b, seq_len=s, ring=ring, ulysses=uly, ring_rank=r, ulysses_rank=u, cu_seqlens=cu,
                      layout=layout) for r in range(ring) for u in range(uly)]


def _cu(rows):
    """cu_seqlens for rows given as lists of document lengths (every row the same total)."""
    cuts = [0]
    for row in rows:
        for n in row:
            cuts.append(cuts[-1] + n)
    return torch.tensor(cuts, dtype=torch.int32)


@pytest.mark.parametrize("layout", ["global", "per_doc"])
@pytest.mark.parametrize("ring,uly", [(1, 1), (2, 1), (3, 1), (4, 1), (1, 2), (1, 3), (2, 2), (3, 2)])
@pytest.mark.parametrize("s", [37, 48])
def test_shard_unshard_and_boundaries(ring, uly, s, layout):
    b = 2
    batch = _packed_batch(b, s, seed=ring * 10 + uly)
    plans = _plans(b, s, ring, uly, batch.cu_seqlens, layout)
    assert plans[0].layout == (layout if ring > 1 else "global")  # one ring slot: nothing to balance
    p0 = plans[0]
    assert p0.padded_len == padded_length(s, ring=ring, ulysses=uly) and p0.padded_len % (2 * ring * uly) == 0
    # every padded index exactly once, in every row; zigzag of the layout positions: slot r = chunks r and 2R-1-r
    allidx = torch.cat([p.index() for p in plans])
    assert torch.equal(allidx.sort().values, torch.arange(p0.padded_len))
    alltok = torch.cat([p.token_index() for p in plans], dim=1)
    assert torch.equal(alltok.sort(dim=1).values, torch.arange(p0.padded_len).expand(b, -1))
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
        for row in range(b):
            idx = p.token_index()[row]  # real index of every local token of this row
            jumps = {i for i in range(1, len(idx)) if idx[i] != idx[i - 1] + 1}
            edges = sorted({0, len(idx) - 1} | jumps | {i - 1 for i in jumps})
            for i in edges:
                t = int(idx[i])
                if t >= s:  # pad: out of the loss
                    assert lb.labels[row, i] == -100 and lb.input_ids[row, i] == 0 and lb.position_ids[row, i] == 0
                    continue
                assert lb.position_ids[row, i] == batch.position_ids[row, t], (row, t)
                assert lb.input_ids[row, i] == batch.input_ids[row, t], (row, t)
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


def _slot_tokens(plans, uly, r):
    """[B, 2c] real index of every token of ring slot r (its Ulysses pieces in order)."""
    return torch.cat([p.token_index() for p in plans[r * uly:(r + 1) * uly]], dim=1)


@pytest.mark.parametrize("ring,uly", [(2, 1), (4, 1), (3, 2)])
def test_per_doc_layout_gives_slot_r_chunks_r_and_mirror_of_every_document(ring, uly):
    rows = [[1, 6, 13, 3, 17, 8], [29, 2, 5, 11, 1]]  # 48 tokens a row; lengths that do and do not divide 2R
    s = 48
    plans = _plans(2, s, ring, uly, _cu(rows), "per_doc")
    c, n = plans[0].chunk, 2 * ring
    for row, docs in enumerate(rows):
        starts = torch.tensor([0] + docs).cumsum(0)
        for d, length in enumerate(docs):
            lo, hi = int(starts[d]), int(starts[d + 1])
            chunks = [None] * n
            for r in range(ring):
                tok = _slot_tokens(plans, uly, r)[row]
                first, second = tok[:c], tok[c:]  # the slot's two halves: chunk r and chunk 2R-1-r
                chunks[r] = first[(first >= lo) & (first < hi)]
                chunks[n - 1 - r] = second[(second >= lo) & (second < hi)]
            # chunk a of the document is a contiguous stretch; in chunk order they tile the document exactly
            assert torch.equal(torch.cat(chunks), torch.arange(lo, hi)), (row, d, chunks)
            sizes = {len(x) for x in chunks}
            assert sizes <= {length // n, -(-length // n)}, (row, d, sizes)  # no padding inside a document


def _slot_work(plans, uly, ring, s, cu):
    """Unmasked causal (q, k) pairs of every ring slot's queries (same document, key not after query)."""
    b = len(plans[0].token_index())
    start = torch.zeros(b, s, dtype=torch.long)  # real index of the document start of every token
    for a, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        start.view(-1)[a:e] = a % s
    work = []
    for r in range(ring):
        tok = _slot_tokens(plans, uly, r)
        real = tok < s
        seen = tok - start.gather(1, tok.clamp(max=s - 1)) + 1  # keys visible to the token: its document prefix
        work.append(int(seen[real].sum()))
    return work


def test_per_doc_layout_balances_causal_work_where_global_does_not():
    ring, s = 4, 256
    # one long document first, then short ones: under one zigzag the long one sits in the early chunks
    rows = [[150, 37, 29, 23, 17], [9, 101, 63, 45, 38]]
    cu = _cu(rows)
    spread = {}
    for layout in ("global", "per_doc"):
        work = _slot_work(_plans(2, s, ring, 1, cu, layout), 1, ring, s, cu)
        spread[layout] = (max(work) - min(work)) / (sum(work) / ring)
    # chunks of one document differ by one token at most, so exact balance is out of reach: within 4% of the mean
    assert spread["per_doc"] < 0.04, spread
    assert spread["global"] > 0.2, spread  # the row-wide zigzag is far off on this batch
    # random packed batches (varied lengths, pad, Ulysses inside the slots): per-document stays balanced
    for seed in range(5):
        batch = _packed_batch(2, 203, seed=seed)
        for ring, uly in ((2, 1), (4, 1), (2, 2)):
            work = _slot_work(_plans(2, 203, ring, uly, batch.cu_seqlens, "per_doc"), uly, ring, 203,
                              batch.cu_seqlens)
            assert (max(work) - min(work)) / (sum(work) / ring) < 0.04, (seed, ring, uly, work)


@pytest.mark.parametrize("ring,uly,causal", [(4, 1, True), (2, 2, True), (3, 1, False), (1, 2, True)])
def test_per_doc_masks_and_block_skipping_match_the_real_mask(ring, uly, causal):
    """What ring/local compute from the plan (virtual positions + layout doc ids) is the real document mask, and
    block skipping drops only fully masked sub-blocks."""
    b, s = 2, 45
    batch = _packed_batch(b, s, seed=3)
    plans = _plans(b, s, ring, uly, batch.cu_seqlens, "per_doc")
    info = plans[0].attn_info(strategy="hybrid", ring_group=None, ulysses_group=None, comm=None)
    if ring == 1:  # one slot: the plan keeps the global layout (nothing to balance)
        assert info.layout == "global"
    else:
        assert info.layout == "per_doc" and info.chunk_ids is None and info.group is None
    doc = torch.full((b, plans[0].padded_len), -1)
    doc[:, :s] = torch.repeat_interleave(torch.arange(len(batch.cu_seqlens) - 1),
                                         (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()).view(b, s)
    for me in range(ring):
        qt = _slot_tokens(plans, uly, me)
        for src in range(ring):
            kt = _slot_tokens(plans, uly, src)
            got = block_mask(info.slot_pos[me], info.slot_pos[src], info.slot_doc[me], info.slot_doc[src], causal)
            qd, kd = doc.gather(1, qt), doc.gather(1, kt)
            want = (qd[:, :, None] == kd[:, None, :]) & (qd[:, :, None] >= 0)
            if causal:
                want &= kt[:, None, :] <= qt[:, :, None]
            real = (qt < s)[:, :, None] & (kt < s)[:, None, :]  # pad-pad visibility is irrelevant (no loss)
            assert torch.equal(got.expand_as(want) & real, want), (me, src)
            kept = torch.zeros_like(want)
            for qs, ks in block_pairs(info, me, src, causal):
                kept[:, qs, ks] = True
            assert not (want & ~kept).any(), (me, src)  # a skipped sub-block had no visible pair


def test_layout_choice_and_linear_fields():
    batch = _packed_batch(1, 32, seed=1)
    glob, per = (ShardPlan(batch_size=1, seq_len=32, ring=2, ulysses=1, ring_rank=0, ulysses_rank=0,
                           cu_seqlens=batch.cu_seqlens, layout=lay) for lay in ("global", "per_doc"))
    assert glob.attn_info(strategy="ring", ring_group=None, ulysses_group=None, comm=None).chunk_ids == (0, 3)
    with pytest.raises(ValueError, match="layout='global'"):
        per.linear_chunk_ids()
    # without documents the row is one document: per_doc falls back to the global zigzag
    assert ShardPlan(batch_size=1, seq_len=32, ring=2, ulysses=1, ring_rank=0, ulysses_rank=0,
                     layout="per_doc").layout == "global"
    with pytest.raises(ValueError, match="layout='stripe'"):
        ShardPlan(batch_size=1, seq_len=32, ring=2, ulysses=1, ring_rank=0, ulysses_rank=0, layout="stripe")
    with pytest.raises(ValueError, match="rows at dim 0"):
        per.shard(torch.zeros(32, 1), dim=0)
    mc = lambda attention, layers=None: SimpleNamespace(attention=attention, attention_layers=layers)
    assert shard_layout(mc("dense")) == "per_doc" and shard_layout(mc("ring", {"1": "ring"})) == "per_doc"
    assert shard_layout(mc("linear")) == "global" and shard_layout(mc("dense", {"0": "linear"})) == "global"
