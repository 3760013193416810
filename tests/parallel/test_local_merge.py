"""The local block function, its flash-style backward and the (out, lse) merge against a dense fp64 reference."""

from __future__ import annotations

import torch

from cp_reference import dense_reference, doc_ids_from_cu, random_cu_seqlens
from longreach.parallel.local import local_attention, local_attention_backward
from longreach.parallel.merge import merge_


def _qkv(b, s, hq, hkv, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(b, s, h, d, generator=g, dtype=torch.float64).to(dtype)
    return mk(hq), mk(hkv), mk(hkv)


def test_local_matches_dense_forward_and_backward_with_docs_and_gqa():
    b, s, hq, hkv, d = 2, 37, 4, 2, 8
    q, k, v = _qkv(b, s, hq, hkv, d)
    cu = random_cu_seqlens(b, s, torch.Generator().manual_seed(3))
    pos = torch.arange(s)
    doc = doc_ids_from_cu(cu, b, s)
    out, lse = local_attention(q, k, v, causal=True, q_pos=pos, k_pos=pos, q_doc=doc, k_doc=doc)
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    ref, ref_lse = dense_reference(qr, kr, vr, causal=True, cu_seqlens=cu)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0, msg="out")
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=0, msg="lse")
    dout = torch.randn_like(ref)
    ref.backward(dout)
    dq, dk, dv = local_attention_backward(q, k, v, out, lse, dout, causal=True, q_pos=pos, k_pos=pos, q_doc=doc, k_doc=doc)
    for name, got, want in (("dq", dq, qr.grad), ("dk", dk, kr.grad), ("dv", dv, vr.grad)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0, msg=name)


def test_fully_masked_rows_give_zero_and_minus_inf():
    q, k, v = _qkv(1, 4, 2, 2, 8)
    out, lse = local_attention(q, k, v, causal=True, q_pos=torch.arange(4), k_pos=torch.arange(10, 14))
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    dq, dk, dv = local_attention_backward(q, k, v, out, lse, torch.ones_like(q), causal=True, q_pos=torch.arange(4),
                                          k_pos=torch.arange(10, 14))
    assert all(torch.all(g == 0) for g in (dq, dk, dv))


def test_merge_of_key_blocks_equals_attention_over_all_keys():
    b, s, h, d = 1, 29, 2, 8
    q, k, v = _qkv(b, s, h, h, d, seed=1)
    pos = torch.arange(s)
    ref, ref_lse = local_attention(q, k, v, causal=True, q_pos=pos, k_pos=pos)
    out = torch.zeros_like(ref)
    lse = torch.full_like(ref_lse, float("-inf"))
    for a, e in ((20, 29), (0, 7), (7, 20)):  # any order, including blocks fully masked for early queries
        o, l = local_attention(q, k[:, a:e], v[:, a:e], causal=True, q_pos=pos, k_pos=pos[a:e])
        merge_(out, lse, o, l)
    torch.testing.assert_close(out, ref, atol=1e-13, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-13, rtol=0)
