"""The zigzag ring schedule: which (query chunk, key chunk) sub-blocks each step computes."""

from __future__ import annotations

import torch

from longreach.parallel.plan import ShardPlan
from longreach.parallel.ring import block_pairs


def _info(ring, s=64, cu=None, b=1):
    plan = ShardPlan(batch_size=b, seq_len=s, ring=ring, ulysses=1, ring_rank=0, ulysses_rank=0, cu_seqlens=cu)
    return plan.attn_info(strategy="ring", ring_group=None, ulysses_group=None, comm=None)


def test_causal_zigzag_skips_masked_sub_blocks_and_balances_work():
    ring = 4
    info = _info(ring)
    n = info.slot_pos.shape[1]
    h = n // 2
    first, second = slice(0, h), slice(h, n)
    for me in range(ring):
        counts = []
        for step in range(ring):
            src = (me - step) % ring
            pairs = block_pairs(info, me, src, causal=True)
            counts.append(len(pairs))
            if step == 0:  # diagonal: both causal diagonals + second query chunk over first key chunk
                assert pairs == [(first, first), (second, first), (second, second)]
            elif src < me:  # an earlier slot: its first chunk precedes both of ours, its second follows both
                assert pairs == [(first, first), (second, first)]
            else:  # a later slot: only our second (late) chunk sees it
                assert pairs == [(second, first), (second, second)]
        assert counts == [3] + [2] * (ring - 1)
    assert all(len(block_pairs(info, 0, src, causal=False)) == 4 for src in range(ring))


def test_blocks_without_a_shared_document_are_skipped():
    # two rows, documents [0, 16) and [16, 64) in each: slot 0 holds chunks 0 and 7 (tokens 0-7 and 56-63)
    s = 64
    cu = torch.tensor([0, 16, 64, 64 + 16, 128], dtype=torch.int32)
    info = _info(4, s, cu, b=2)
    pairs = block_pairs(info, 0, 1, causal=True)  # slot 1 = tokens 8-15 (doc 0) and 48-55 (doc 1)
    n = info.slot_pos.shape[1]
    h = n // 2
    # tokens 0-7 vs 8-15: same document but every key is after every query (causal skip)
    assert (slice(0, h), slice(0, h)) not in pairs
    assert (slice(h, n), slice(0, h)) not in pairs  # tokens 56-63 (doc 1) vs 8-15 (doc 0): no shared document
    assert (slice(h, n), slice(h, n)) in pairs  # 56-63 vs 48-55, same document, earlier keys
