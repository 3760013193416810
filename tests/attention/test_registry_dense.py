"""Registry contract and the 'dense' entry against an fp64 masked reference (GQA, packed documents)."""

import math

import pytest
import torch

from longreach.attention import registry
from longreach.attention.context import AttnContext, cu_seqlens_from_position_ids


def masked_reference(q, k, v, doc_ids=None, causal=True):
    """fp64 dense attention with repeated KV and an explicit [S, S] mask."""
    q, k, v = (x.double() for x in (q, k, v))
    b, s, hq, d = q.shape
    rep = hq // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    mask = torch.ones(s, s, dtype=torch.bool)
    if causal:
        mask = torch.tril(mask)
    mask = mask.expand(b, s, s)
    if doc_ids is not None:
        mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def test_unknown_and_duplicate_names():
    with pytest.raises(KeyError, match="dense"):
        registry.get("no-such-attention")
    with pytest.raises(ValueError, match="already registered"):
        registry.register("dense")(lambda q, k, v, *, ctx: q)
    assert "dense" in registry.names()


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2)])
@pytest.mark.parametrize("packed", [False, True])
def test_dense_matches_reference(hq, hkv, packed):
    torch.manual_seed(0)
    b, s, d = 2, 37, 16
    q = torch.randn(b, s, hq, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, s, hkv, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, s, hkv, d, dtype=torch.float64, requires_grad=True)
    if packed:
        pos = torch.cat([torch.arange(11), torch.arange(20), torch.arange(6)]).expand(b, s).clone()
        pos[1] = torch.cat([torch.arange(30), torch.arange(7)])
        ctx = AttnContext(cu_seqlens=cu_seqlens_from_position_ids(pos))
        doc_ids = ctx.doc_ids(b, s, q.device)
    else:
        ctx, doc_ids = AttnContext(), None
    impl = registry.build(registry.AttnSpec("dense", 0, hq, hkv, d))
    out = impl(q, k, v, ctx=ctx)
    ref = masked_reference(q, k, v, doc_ids)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for name, a, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9, msg=lambda m: f"d{name}: {m}")


def test_dense_refuses_context_parallel_batches():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="parallel.cp"):
        registry.build(registry.AttnSpec("dense", 0, 2, 2, 8))(q, q, q, ctx=AttnContext(parallel=object()))
