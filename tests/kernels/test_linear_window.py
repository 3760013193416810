"""Fused window + linear hybrid kernel and hedgehog feature-map kernel (Triton, CPU interpreter) vs the torch
definitions in fp64: outputs and every gradient (q, k, v, phi(q), phi(k), prefixes, initial states, the
feature map's weight and bias), within fp32 rel-RMSE < 1e-4; GQA, lengths that are not a multiple of the
64-token tile, windows reaching one and two tiles back, W = 1; the 'linear' module end to end."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit decorates the kernels

import pytest
import torch

from longreach.attention import registry
from longreach.attention.context import AttnContext
from longreach.attention.feature_maps import HedgehogMap
from longreach.kernels.linear_attention.hedgehog import hedgehog_feature_map
from longreach.kernels.linear_attention.hybrid import hybrid_parts
from longreach.kernels.linear_attention.window import hybrid_window_linear, lag

TOL = 1e-4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp_min(1e-30))


def close(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    assert torch.isfinite(a).all(), f"{name}: not finite"
    if b.abs().max() == 0:  # e.g. dq at W = 1 (a one-key softmax is constant): compare absolutely
        assert a.abs().max() < 1e-5, f"{name}: expected zeros, max {a.abs().max():.2e}"
    else:
        assert rel(a, b) < TOL, f"{name}: rel-RMSE {rel(a, b):.2e}"


def _gen(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731


def _hybrid_inputs(b, t, hq, hkv, d, f, seed):
    mk = _gen(seed)
    # positive features, like a softmax feature map's (the denominator must stay away from zero)
    return [mk(b, t, hq, d), mk(b, t, hkv, d), mk(b, t, hkv, d), mk(b, t, hq, f).abs(), mk(b, t, hkv, f).abs()]


def _grads(outs, leaves, seed):
    mk = _gen(seed)
    ws = [mk(*o.shape) for o in outs]
    return torch.autograd.grad(sum((o.double() * w).sum() for o, w in zip(outs, ws)), leaves)


@pytest.mark.parametrize("t,hq,hkv,d,f,window,normalize", [
    (150, 4, 2, 16, 8, 20, True),     # GQA, unaligned, window within one tile back
    (128, 2, 2, 16, 16, 64, False),   # the LoLCATs default W = 64 = tile (lag 1), raw num/den
    (100, 2, 1, 16, 8, 70, True),     # MQA, window reaching two tiles back (lag 2)
    (64, 2, 2, 8, 8, 1, True),        # W = 1: the window is the token itself
])
def test_fused_kernel_matches_torch_definition(t, hq, hkv, d, f, window, normalize):
    x64 = _hybrid_inputs(2, t, hq, hkv, d, f, seed=t + window)
    xk = [x.float().requires_grad_() for x in x64]
    xr = [x.clone().requires_grad_() for x in x64]
    eps = 1e-3
    out = hybrid_window_linear(*xk, window=window, scale=0.5, eps=eps, normalize=normalize)
    ref = hybrid_parts(*xr, window=window, scale=0.5)  # fp64: the torch definition
    if normalize:
        outs, refs = [out[0]], [ref.num / (ref.den[..., None] + eps)]
        assert out[0].dtype == torch.float32
    else:
        outs, refs = list(out), [ref.num, ref.den]
    for name, a, b in zip(["out/num", "den"], outs, refs):
        close(a, b, name)
    for name, a, b in zip(["dq", "dk", "dv", "dfq", "dfk"], _grads(outs, xk, 1), _grads(refs, xr, 1)):
        close(a, b, name)
    assert lag(window) == -(-(window - 1) // 64)


def test_fused_parts_with_prefix_and_states_match_torch():
    # the context-parallel call: prefix (previous rank's tail), initial state, final state, all differentiable
    b, t, hq, hkv, d, f, w = 1, 90, 4, 2, 16, 8, 24
    mk = _gen(11)
    x64 = _hybrid_inputs(b, t, hq, hkv, d, f, seed=12) + [mk(b, w - 5, hkv, d), mk(b, w - 5, hkv, d),
                                                         mk(b, w - 5, hkv, f).abs(), mk(b, hkv, f, d),
                                                         mk(b, hkv, f).abs()]
    xk = [x.float().requires_grad_() for x in x64]
    xr = [x.clone().requires_grad_() for x in x64]

    def run(x):
        return hybrid_parts(*x[:5], window=w, scale=0.4, prefix_k=x[5], prefix_v=x[6], prefix_fk=x[7],
                            initial_state=x[8], initial_z=x[9], output_final_state=True)
    out, ref = run(xk), run(xr)
    assert out.num.dtype == torch.float32 and ref.num.dtype == torch.float64
    for name, a, r in zip(["num", "den", "state", "z"], out, ref):
        close(a, r, name)
    names = ["dq", "dk", "dv", "dfq", "dfk", "dprefix_k", "dprefix_v", "dprefix_fk", "dstate0", "dz0"]
    for name, a, r in zip(names, _grads(list(out), xk, 2), _grads(list(ref), xr, 2)):
        close(a, r, name)


@pytest.mark.parametrize("s,h,hkv,d,fh,dtype", [
    (100, 4, 2, 16, 8, torch.float32),
    (70, 2, 1, 24, 12, torch.bfloat16),   # D, F2 not powers of two; bf16 at bf16 tolerance
])
def test_hedgehog_kernel_matches_torch(s, h, hkv, d, fh, dtype):
    m = HedgehogMap(hkv, d, fh).double()
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    x = _gen(4)(2, s, h, d)
    xr = x.clone().requires_grad_()
    ref = m(xr)  # fp64: torch
    xk = x.to(dtype).requires_grad_()
    wk, bk = (p.detach().float().requires_grad_() for p in (m.weight, m.bias))
    out = hedgehog_feature_map(xk, wk, bk)
    assert out.dtype == dtype and out.shape == ref.shape
    tol = TOL if dtype == torch.float32 else 1e-2
    assert rel(out, ref) < tol
    for name, a, r in zip(["dx", "dW", "db"], _grads([out], [xk, wk, bk], 5), _grads([ref], [xr, m.weight, m.bias], 5)):
        assert a.shape == r.shape, name
        assert rel(a, r) < tol, f"{name}: rel-RMSE {rel(a, r):.2e}"


def test_module_on_kernels_matches_module_in_fp64():
    # fp32 goes through both kernels (interpreter), fp64 through the torch definition: same module, same numbers
    spec = registry.AttnSpec("linear", 0, 4, 2, 16, {"feature_map": "hedgehog", "window": 16, "feature_dim": 8})
    m64 = registry.build(spec).double()
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in m64.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    m32 = registry.build(spec)
    m32.load_state_dict({k_: v_.float() for k_, v_ in m64.state_dict().items()})
    mk = _gen(9)
    x64 = [mk(1, 80, 4, 16), mk(1, 80, 2, 16), mk(1, 80, 2, 16)]
    xk = [x.float().requires_grad_() for x in x64]
    xr = [x.clone().requires_grad_() for x in x64]
    out, ref = m32(*xk, ctx=AttnContext()), m64(*xr, ctx=AttnContext())
    close(out, ref, "out")
    ga = _grads([out], xk + list(m32.parameters()), 6)
    gb = _grads([ref], xr + list(m64.parameters()), 6)
    names = ["dq", "dk", "dv"] + [f"d{n}" for n, _ in m32.named_parameters()]
    for name, a, b in zip(names, ga, gb):
        close(a, b, name)


def test_bad_window_raises():
    x = _hybrid_inputs(1, 8, 2, 2, 8, 8, seed=0)
    with pytest.raises(ValueError, match="window >= 1"):
        hybrid_window_linear(*(t.float() for t in x), window=0, scale=1.0)
