"""S2 (sparse-sharded) attention kernel (Triton; the interpreter on CPU) against an fp64 masked dense reference."""

import pytest
import torch

from longreach.kernels import s2_attention
from longreach.kernels.s2 import S2Pattern, s2_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def rand(*shape):
    return torch.randn(*shape, device=DEV).to(torch.bfloat16)


def run_case(s, hq, hkv, pattern: S2Pattern, docs=None):
    d = 64
    q, k, v = (rand(1, s, h, d).requires_grad_() for h in (hq, hkv, hkv))
    cu = torch.tensor(docs, dtype=torch.int32, device=DEV) if docs else None
    out, lse = s2_attention(q, k, v, block=pattern.block, window=pattern.window, sink=pattern.sink,
                            stride=pattern.stride, dense_heads=pattern.dense_heads, cu_seqlens=cu)
    do = torch.randn_like(out)
    out.backward(do)
    cu_ref = cu if cu is not None else torch.tensor([0, s], dtype=torch.int32)
    q64, k64, v64 = (x[0].detach().double().requires_grad_() for x in (q, k, v))
    o64, l64 = s2_reference(q64, k64, v64, cu_ref, pattern=pattern, scale=d ** -0.5)
    o64.backward(do[0].double())
    qb, kb, vb = (x[0].detach().requires_grad_() for x in (q, k, v))  # plain torch, bf16
    ob, _ = s2_reference(qb, kb, vb, cu_ref, pattern=pattern, scale=d ** -0.5)
    ob.backward(do[0])
    assert rel(lse[0], l64) < 1e-4, "lse"
    for name, mine, base, truth in (("out", out[0], ob, o64), ("dq", q.grad[0], qb.grad, q64.grad),
                                    ("dk", k.grad[0], kb.grad, k64.grad), ("dv", v.grad[0], vb.grad, v64.grad)):
        err, err_torch = rel(mine, truth), rel(base, truth)
        assert err <= 2 * err_torch + 1e-3, f"{name}: kernel error {err:.2e} vs torch bf16 {err_torch:.2e}"
    return pattern.density(s, hkv)


@pytest.mark.parametrize("s,hq,hkv,pattern,max_density", [
    # sparse: window of 2 blocks, 1 sink block, stride 3 over 2 kv heads (stride > kv heads: some blocks unowned)
    (267, 4, 2, S2Pattern(block=16, window=32, sink=16, stride=3), 0.75),
    # no sink, one dense kv head, GQA group of 2
    (200, 4, 2, S2Pattern(block=16, window=16, sink=0, stride=2, dense_heads=(1,)), 0.9),
    # pattern block of two kernel tiles (the flat walk steps inside a block), shard blocks of both heads
    (420, 4, 2, S2Pattern(block=64, window=64, sink=64, stride=3), 0.75),
])
def test_s2_matches_reference(s, hq, hkv, pattern, max_density):
    torch.manual_seed(s)
    density = run_case(s, hq, hkv, pattern)
    assert density < max_density  # the case really skips blocks


def test_s2_packed_documents_restart_pattern():
    torch.manual_seed(5)
    run_case(230, 2, 1, S2Pattern(block=32, window=32, sink=32, stride=2), docs=[0, 97, 98, 230])


def test_s2_atomic_dq_backward(monkeypatch):
    """dq from the dk/dv programs' atomics (no dq pass) on the sparse walk: same gradients."""
    from longreach.kernels.flash import triton as tk

    monkeypatch.setitem(tk.OVERRIDE, "atomic_dq", True)
    torch.manual_seed(6)
    run_case(267, 4, 2, S2Pattern(block=16, window=32, sink=16, stride=3))
    run_case(230, 2, 1, S2Pattern(block=32, window=32, sink=32, stride=2), docs=[0, 97, 98, 230])


def test_s2_backward_pointer_loads(monkeypatch):
    """The backward's pointer-load path (where TMA descriptors are unavailable) on the sparse walk with documents."""
    from longreach.kernels.flash import triton as tk

    monkeypatch.setitem(tk.OVERRIDE, "bwd_tma", False)
    torch.manual_seed(7)
    run_case(230, 2, 1, S2Pattern(block=32, window=32, sink=32, stride=2), docs=[0, 97, 98, 230])


def test_heads_together_cover_context():
    p = S2Pattern(block=16, window=16, sink=0, stride=4)
    m = p.token_mask(128, 4)  # [Hkv, S, S]
    causal = torch.ones(128, 128, dtype=torch.bool).tril()
    assert torch.equal(m.any(0), causal)  # stride == kv heads: the union is the full causal mask
    assert not torch.equal(m[0], causal)


def test_dense_flag_is_flash_and_bad_pattern_raises():
    torch.manual_seed(6)
    q, k, v = rand(1, 40, 2, 64), rand(1, 40, 1, 64), rand(1, 40, 1, 64)
    from longreach.kernels import flash_attention

    o1 = s2_attention(q, k, v, dense=True, return_lse=False)
    o2 = flash_attention(q, k, v, return_lse=False)
    assert torch.equal(o1, o2)
    with pytest.raises(ValueError, match="window=24"):
        s2_attention(q, k, v, block=16, window=24)
    with pytest.raises(ValueError, match="sink=8"):
        s2_attention(q, k, v, block=16, window=32, sink=8)


def test_registry_entries_flash_and_s2():
    from longreach.attention import registry
    from longreach.attention.context import AttnContext

    torch.manual_seed(7)
    q, k, v = rand(2, 48, 2, 64), rand(2, 48, 1, 64), rand(2, 48, 1, 64)
    cu = torch.tensor([0, 20, 48, 96], dtype=torch.int32)
    ctx = AttnContext(cu_seqlens=cu)
    dense = registry.build(registry.AttnSpec("dense", 0, 2, 1, 64))(q, k, v, ctx=ctx)
    flash = registry.build(registry.AttnSpec("flash", 0, 2, 1, 64))(q, k, v, ctx=ctx)
    # a window covering every document makes s2 dense
    s2 = registry.build(registry.AttnSpec("s2", 1, 2, 1, 64, {"block": 16, "window": 64, "sink": 0}))(q, k, v, ctx=ctx)
    assert rel(flash, dense) < 2e-2 and rel(s2, dense) < 2e-2
