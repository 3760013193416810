"""The 'linear' attention module: hybrid window + linear output and gradients equal a brute-force [S, S]
evaluation of the LoLCATs formula (fp64), for every feature map, GQA, odd lengths; packed documents reset
the state; prefill + recurrent decode equals the full forward; the attention-transfer loss."""

import math

import pytest
import torch

from longreach.attention import registry
from longreach.attention.context import AttnContext
from longreach.attention.linear import LinearAttention, attention_transfer_loss


def build(hq=4, hkv=2, d=16, **opts) -> LinearAttention:
    m = registry.build(registry.AttnSpec("linear", 0, hq, hkv, d, opts)).double()
    with torch.no_grad():  # move off the identity init so the learned maps are exercised
        g = torch.Generator().manual_seed(0)
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def qkv(b=2, s=37, hq=4, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *sh: torch.randn(*sh, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    return mk(b, s, hq, d), mk(b, s, hkv, d), mk(b, s, hkv, d)


def brute_force(m: LinearAttention, q, k, v, scale):
    """y_t = (sum_win exp(s - max) v + sum_{j<=t-W} phi(q)phi(k) v) / (same without v + eps), all [S, S]."""
    w = m.window
    fq, fk = m.feature_map_q(q), m.feature_map_k(k)
    b, s, hq, d = q.shape
    g = hq // k.shape[2]
    kr, vr, fkr = (x.repeat_interleave(g, 2) for x in (k, v, fk))
    t = torch.arange(s)
    causal = t[None, :] <= t[:, None]
    win = causal & (t[None, :] > t[:, None] - w)
    sc = (torch.einsum("bthd,bshd->bhts", q, kr) * scale).masked_fill(~win, float("-inf"))
    a_sm = torch.exp(sc - sc.amax(-1, keepdim=True)) if w else torch.zeros_like(sc)
    a_ln = torch.einsum("bthf,bshf->bhts", fq, fkr).masked_fill(~(causal & ~win), 0.0)
    a = a_sm + a_ln
    return torch.einsum("bhts,bshd->bthd", a, vr) / (a.sum(-1).transpose(1, 2)[..., None] + m.eps)


@pytest.mark.parametrize("fmap", ["hedgehog", "taylor", "elu"])
@pytest.mark.parametrize("window", [0, 8, 64])
def test_module_matches_brute_force(fmap, window):
    m = build(feature_map=fmap, window=window, feature_dim=8)
    q, k, v = qkv()
    out = m(q, k, v, ctx=AttnContext())
    ref = brute_force(m, q, k, v, 16 ** -0.5)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    w = torch.randn_like(out)
    leaves = [q, k, v] + list(m.parameters())
    for a, b in zip(torch.autograd.grad((out * w).sum(), leaves), torch.autograd.grad((ref * w).sum(), leaves)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_feature_map_dims_and_taylor_identity():
    m = build(hq=2, hkv=1, d=8, feature_map="taylor", feature_dim=8)
    with torch.no_grad():
        m.feature_map_q.weight.copy_(torch.eye(8)[None])
        m.feature_map_k.weight.copy_(torch.eye(8)[None])
    q, k, _ = qkv(1, 5, 2, 1, 8)
    fq, fk = m.feature_map_q(q), m.feature_map_k(k)
    assert fq.shape == (1, 5, 2, 1 + 8 + 64)
    s = torch.einsum("bthd,bshd->bhts", q, k.expand(-1, -1, 2, -1)) / math.sqrt(8)
    torch.testing.assert_close(torch.einsum("bthf,bshf->bhts", fq, fk.expand(-1, -1, 2, -1)), 1 + s + s * s / 2)
    h = build(hq=4, hkv=2, d=16, feature_map="hedgehog", feature_dim=8)
    assert h.feature_map_q.weight.shape == (2, 16, 8)  # per KV head, never per query head
    assert h.feature_map_q(qkv()[0]).shape[-1] == 16


def test_packed_documents_reset_state():
    m = build(window=4)
    q, k, v = qkv(b=2, s=24)
    cu = torch.tensor([0, 10, 24, 31, 48], dtype=torch.int32)  # row boundaries 0, 24, 48 are doc boundaries
    out = m(q, k, v, ctx=AttnContext(cu_seqlens=cu))
    flat = [x.reshape(1, 48, *x.shape[2:]) for x in (q, k, v)]
    ref = torch.cat([m(*(x[:, a:e] for x in flat), ctx=AttnContext()) for a, e in [(0, 10), (10, 24), (24, 31),
                                                                                    (31, 48)]], dim=1)
    torch.testing.assert_close(out.reshape(1, 48, 4, 16), ref)


@pytest.mark.parametrize("window", [0, 6])
def test_prefill_then_decode_equals_full_forward(window):
    m = build(window=window)
    q, k, v = (x.detach() for x in qkv(s=30))
    ctx = AttnContext()
    full = m(q, k, v, ctx=ctx)
    out, cache = m.prefill(q[:, :20], k[:, :20], v[:, :20], ctx=ctx)
    outs = [out]
    for t in range(20, 30):
        o, cache = m.decode_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], cache, ctx=ctx)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-10)
    assert cache.k_win.shape[1] == window  # the cache never grows past the window


def test_attention_transfer_loss_trains_only_the_feature_map():
    m = build(window=4)
    q, k, v = qkv()
    loss, out, teacher = attention_transfer_loss(m, q, k, v, ctx=AttnContext())
    from longreach.attention.dense import dense_attention
    torch.testing.assert_close(teacher, dense_attention(q, k, v, ctx=AttnContext()))
    torch.testing.assert_close(loss, ((out - teacher) ** 2).mean().float())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_bad_options_raise():
    with pytest.raises(ValueError, match="unknown options"):
        build(windw=3)
    with pytest.raises(ValueError, match="feature_map='softmax'"):
        build(feature_map="softmax")
    m = build()
    q, k, v = qkv()
    with pytest.raises(ValueError, match="ctx.parallel"):
        m(q, k, v, ctx=AttnContext(parallel=object()))
