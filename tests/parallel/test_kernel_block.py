"""The ring's Triton local block (``parallel/kernel_block.py``; the kernel runs under the CPU interpreter) equals the
plain-torch block of ``parallel/local.py`` on every sub-block of the zigzag schedules: global and per-document
layouts, packed documents with odd lengths and pad, GQA, forward (out, lse) and backward given the final
merged out/lse. Every sub-block of these layouts must take the kernel path (no silent fallback)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from cp_reference import random_cu_seqlens
from longreach.parallel.kernel_block import (block_backward, block_backward_into, block_forward, block_forward_into,
                                             block_segments, use_block_kernel)
from longreach.parallel.local import local_attention, local_attention_backward
from longreach.parallel.merge import merge_
from longreach.parallel.plan import ShardPlan
from longreach.parallel.ring import _mask_args, block_pairs


def _slots(b, s, ring, cu, layout):
    plan = ShardPlan(batch_size=b, seq_len=s, ring=ring, ulysses=1, ring_rank=0, ulysses_rank=0, cu_seqlens=cu,
                     layout=layout)
    return plan.attn_info(strategy="ring", ring_group=None, ulysses_group=None, comm=None)


@pytest.mark.parametrize("ring,b,s,packed,layout,causal", [
    (2, 2, 37, True, "per_doc", True),
    (3, 2, 50, True, "global", True),
    (2, 1, 40, False, "global", True),
    (2, 1, 29, True, "per_doc", False),
    (3, 1, 30, True, "per_doc", True),
])
def test_kernel_block_equals_torch_block(ring, b, s, packed, layout, causal):
    torch.manual_seed(ring * 100 + s)
    hq, hkv, d, scale = 2, 1, 16, 0.3
    cu = random_cu_seqlens(b, s, torch.Generator().manual_seed(s)) if packed else None
    info = _slots(b, s, ring, cu, layout)
    pos, doc = info.slot_pos, info.slot_doc
    n = pos.shape[1]
    x = {r: [torch.randn(b, n, h, d, dtype=torch.float64) for h in (hq, hkv, hkv, hq)] for r in range(ring)}
    for me in range(ring):
        q, _, _, dout = x[me]
        ref_out = torch.zeros(b, n, hq, d, dtype=torch.float64)
        ref_lse = torch.full((b, hq, n), float("-inf"), dtype=torch.float64)
        out = torch.zeros(b, n, hq, d)
        lse = torch.full((b, hq, n), float("-inf"))
        pairs = [(src, qs, ks) for src in range(ring) for qs, ks in block_pairs(info, me, src, causal)]
        for src, qs, ks in pairs:
            _, k, v, _ = x[src]
            segs = block_segments(pos[me, qs], pos[src, ks], None if doc is None else doc[me][:, qs],
                                  None if doc is None else doc[src][:, ks], causal)
            assert segs is not None, f"me={me} src={src} {qs} {ks}: the zigzag block fell back to torch"
            o, l = block_forward(q[:, qs].float(), k[:, ks].float(), v[:, ks].float(), segs, scale)
            ro, rl = local_attention(q[:, qs], k[:, ks], v[:, ks], scale=scale, causal=causal,
                                     **_mask_args(info, pos, doc, me, src, qs, ks))
            torch.testing.assert_close(l.double(), rl, atol=2e-5, rtol=0)
            torch.testing.assert_close(o.double(), ro, atol=2e-5, rtol=0)
            if b == 1:  # the ring's batch-1 path: the kernel merges into the running (out, lse) itself
                block_forward_into(q[:, qs].float(), k[:, ks].float(), v[:, ks].float(), segs, scale, out[:, qs],
                                   lse[:, :, qs])
            else:
                merge_(out[:, qs], lse[:, :, qs], o, l)
            merge_(ref_out[:, qs], ref_lse[:, :, qs], ro, rl)
        torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=0)
        torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=0)
        for src, qs, ks in pairs:  # backward of each block given the final merged rows
            _, k, v, _ = x[src]
            segs = block_segments(pos[me, qs], pos[src, ks], None if doc is None else doc[me][:, qs],
                                  None if doc is None else doc[src][:, ks], causal)
            g = block_backward(q[:, qs].float(), k[:, ks].float(), v[:, ks].float(), out[:, qs], lse[:, :, qs],
                               dout[:, qs].float(), segs, scale)
            gr = local_attention_backward(q[:, qs], k[:, ks], v[:, ks], ref_out[:, qs], ref_lse[:, :, qs], dout[:, qs],
                                          scale=scale, causal=causal, **_mask_args(info, pos, doc, me, src, qs, ks))
            for name, a, r in zip(("dq", "dk", "dv"), g, gr):
                assert a.dtype == torch.float32
                torch.testing.assert_close(a.double(), r, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
            if b == 1:  # the batch-1 path adds into existing accumulators
                accs = [torch.randn(a.shape) for a in g]
                start = [a.clone() for a in accs]
                block_backward_into(q[:, qs].float(), k[:, ks].float(), v[:, ks].float(), out[:, qs], lse[:, :, qs],
                                    dout[:, qs].float(), segs, scale, *accs)
                for name, a, a0, r in zip(("dq", "dk", "dv"), accs, start, gr):
                    torch.testing.assert_close((a - a0).double(), r, atol=1e-4, rtol=1e-4,
                                               msg=lambda m: f"{name} accumulated: {m}")


def test_segments_refuse_what_one_call_cannot_express():
    # keys interleaved with the queries (neither before, after, nor the same positions): torch block
    assert block_segments(torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5]), None, None, causal=True) is None
    # one document full, another on the diagonal: two mask kinds, torch block
    qd, kd = torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 0, 1, 1]])
    assert block_segments(torch.tensor([4, 5, 8, 9]), torch.tensor([0, 1, 8, 9]), qd, kd, causal=True) is None
    # documents only on one side get empty partners; keys after the queries are skipped
    segs = block_segments(torch.tensor([10, 11, 12]), torch.tensor([0, 1, 2, 3]), torch.tensor([[1, 1, 2]]),
                          torch.tensor([[0, 1, 1, 3]]), causal=True)
    assert segs.mask == "full"
    assert segs.cu_q.tolist() == [0, 0, 2, 3, 3] and segs.cu_k.tolist() == [0, 1, 3, 3, 4]
    segs = block_segments(torch.tensor([0, 1]), torch.tensor([5, 6]), None, None, causal=True)
    assert segs.cu_q.tolist() == [0, 2, 2] and segs.cu_k.tolist() == [0, 0, 2]


def test_kernel_only_for_half_precision(monkeypatch):
    x = torch.zeros(1, 4, 2, 16)
    assert not use_block_kernel(x) and not use_block_kernel(x.double())
    assert use_block_kernel(x.bfloat16()) == (os.environ.get("TRITON_INTERPRET") == "1")
    monkeypatch.setenv("LONGREACH_RING_KERNEL", "0")
    assert not use_block_kernel(x.bfloat16())


@pytest.mark.parametrize("ring,s,packed,layout", [(3, 60, False, "global"), (2, 37, True, "global"),
                                                  (2, 41, True, "per_doc"), (1, 30, True, "per_doc")])
def test_kernel_pairs_join_sub_blocks_without_changing_the_step(ring, s, packed, layout):
    """The ring's joined kernel calls (``kernel_pairs``) compute each step exactly as the torch block over the
    fine sub-blocks; without documents every step is one kernel call."""
    from longreach.parallel.ring import kernel_pairs

    torch.manual_seed(ring + s)
    b, hq, hkv, d, scale = 1, 2, 1, 16, 0.3
    cu = random_cu_seqlens(b, s, torch.Generator().manual_seed(s)) if packed else None
    info = _slots(b, s, ring, cu, layout)
    pos, doc = info.slot_pos, info.slot_doc
    n = pos.shape[1]
    x = {r: [torch.randn(b, n, h, d, dtype=torch.float64) for h in (hq, hkv, hkv)] for r in range(ring)}
    for me in range(ring):
        q = x[me][0]
        out, lse = torch.zeros(b, n, hq, d), torch.full((b, hq, n), float("-inf"))
        ref_out, ref_lse = torch.zeros(b, n, hq, d, dtype=torch.float64), torch.full((b, hq, n), float("-inf"),
                                                                                    dtype=torch.float64)
        for src in range(ring):
            _, k, v = x[src]
            work = kernel_pairs(info, me, src, True)
            if not packed:
                assert len(work) == 1 and work[0][2] is not None, f"me={me} src={src}: {len(work)} calls"
            for qs, ks, segs in work:
                if segs is None:
                    o, l_ = local_attention(q[:, qs], k[:, ks], v[:, ks], scale=scale, causal=True,
                                            **_mask_args(info, pos, doc, me, src, qs, ks))
                    merge_(out[:, qs], lse[:, :, qs], o.float(), l_.float())
                else:
                    block_forward_into(q[:, qs].float(), k[:, ks].float(), v[:, ks].float(), segs, scale,
                                       out[:, qs], lse[:, :, qs])
            for qs, ks in block_pairs(info, me, src, True):
                ro, rl = local_attention(q[:, qs], k[:, ks], v[:, ks], scale=scale, causal=True,
                                         **_mask_args(info, pos, doc, me, src, qs, ks))
                merge_(ref_out[:, qs], ref_lse[:, :, qs], ro, rl)
        torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=0)
        torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=0)


def test_one_slot_ring_is_one_kernel_call_equal_to_flash_attention():
    """A one-slot ring (Ulysses after its all-to-all, or one rank) runs the whole row as one kernel call writing the
    final output: equal to flash_attention on the same documents, forward and backward."""
    from longreach.kernels.flash import flash_attention
    from longreach.parallel.hybrid import cp_attention
    from longreach.parallel.plan import single_rank_info
    from longreach.parallel.ring import _one_call

    torch.manual_seed(4)
    s = 70
    cu = torch.tensor([0, 20, 21, 70], dtype=torch.int32)
    info = single_rank_info(batch_size=1, seq_len=s, cu_seqlens=cu)
    assert _one_call(info, True, s) is not None
    q, k, v = (torch.randn(1, s, h, 16).bfloat16().requires_grad_() for h in (4, 2, 2))
    q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    do = torch.randn(1, s, 4, 16).bfloat16()
    out = cp_attention(q, k, v, info=info, causal=True)
    out.backward(do)
    ref, _ = flash_attention(q2, k2, v2, causal=True, cu_seqlens=cu)
    ref.backward(do)
    assert out.dtype == torch.bfloat16
    for a, b in ((out, ref), (q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
