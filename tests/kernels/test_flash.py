"""Flash attention kernel (Triton; the interpreter on CPU) against an fp64 masked dense reference."""

import pytest
import torch

from longreach.kernels import flash_attention, flash_attention_block, flash_attention_block_backward
from longreach.kernels.flash import reference as ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def rand(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device=DEV).to(dtype)


def check_against_reference(q, k, v, cu, *, causal=True):
    """Kernel (bf16) vs fp64 reference on out, lse, dq, dk, dv; error at most 2x (+ slack) that of plain bf16 torch."""
    d = q.shape[-1]
    packed = q.dim() == 3
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out, lse = flash_attention(q, k, v, causal=causal, cu_seqlens=cu)
    do = torch.randn_like(out)
    out.backward(do)
    cu_ref = cu if cu is not None else torch.arange(0, q.shape[0] * q.shape[1] + 1, q.shape[1], dtype=torch.int32)
    flat = lambda x: x.reshape(-1, x.shape[-2], d)  # noqa: E731
    q64, k64, v64 = (flat(x).detach().double().requires_grad_() for x in (q, k, v))
    o64, l64 = ref.attention_reference(q64, k64, v64, cu_ref, cu_ref, causal=causal, scale=d ** -0.5)
    o64.backward(flat(do).double())
    qb, kb, vb = (flat(x).detach().requires_grad_() for x in (q, k, v))  # plain torch in bf16
    ob, _ = ref.attention_reference(qb, kb, vb, cu_ref, cu_ref, causal=causal, scale=d ** -0.5)
    ob.backward(flat(do))
    lse_flat = lse if packed else lse.transpose(0, 1).reshape(lse.shape[1], -1)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert rel(lse_flat, l64) < 1e-4, "lse"
    for name, mine, base, truth in (("out", out, ob, o64), ("dq", q.grad, qb.grad, q64.grad),
                                    ("dk", k.grad, kb.grad, k64.grad), ("dv", v.grad, vb.grad, v64.grad)):
        err, err_torch = rel(flat(mine), truth), rel(base, truth)
        assert err <= 2 * err_torch + 1e-3, f"{name}: kernel error {err:.2e} vs torch bf16 {err_torch:.2e}"


@pytest.mark.parametrize("b,s,hq,hkv", [(2, 77, 4, 2), (1, 130, 2, 2)])
def test_flash_matches_reference_batched(b, s, hq, hkv):
    torch.manual_seed(b * 1000 + s)
    check_against_reference(rand(b, s, hq, 64), rand(b, s, hkv, 64), rand(b, s, hkv, 64), None)


def test_flash_packed_documents_gqa():
    torch.manual_seed(1)
    cu = torch.tensor([0, 50, 51, 140, 190], dtype=torch.int32)
    check_against_reference(rand(190, 4, 64), rand(190, 1, 64), rand(190, 1, 64), cu)


def test_flash_fused_backward(monkeypatch):
    """dk/dv and dq as the two halves of one launch (the kernels' other schedule) give the same gradients."""
    from longreach.kernels.flash import triton as tk

    monkeypatch.setitem(tk.OVERRIDE, "fused", True)
    torch.manual_seed(8)
    cu = torch.tensor([0, 45, 100], dtype=torch.int32)
    check_against_reference(rand(100, 4, 64), rand(100, 2, 64), rand(100, 2, 64), cu)


def test_flash_backward_tma_and_pointer_loads_agree(monkeypatch):
    """The backward's two load paths (TMA tensor descriptors, the default where supported; per-thread pointers)
    both match the reference on packed documents with GQA, and the descriptor path is the one taken by default."""
    from longreach.kernels.flash import triton as tk

    used = []
    real = tk._descs
    monkeypatch.setattr(tk, "_descs", lambda on, xs, box: (used.append(on), real(on, xs, box))[1])
    cu = torch.tensor([0, 37, 38, 121], dtype=torch.int32)
    for tma in (True, False):
        monkeypatch.setitem(tk.OVERRIDE, "bwd_tma", tma)
        torch.manual_seed(11)
        check_against_reference(rand(121, 4, 64), rand(121, 2, 64), rand(121, 2, 64), cu)
        assert used and all(u == tma for u in used)
        used.clear()


def test_flash_atomic_dq_backward(monkeypatch):
    """dq added by the dk/dv programs with atomics (no dq pass) gives the same gradients: packed documents,
    GQA, odd lengths, and the ring's block backward with fp32 gradients."""
    from longreach.kernels.flash import triton as tk

    monkeypatch.setitem(tk.OVERRIDE, "atomic_dq", True)
    torch.manual_seed(9)
    cu = torch.tensor([0, 45, 46, 133], dtype=torch.int32)
    check_against_reference(rand(133, 4, 64), rand(133, 2, 64), rand(133, 2, 64), cu)
    check_against_reference(rand(1, 77, 2, 64), rand(1, 77, 1, 64), rand(1, 77, 1, 64), None, causal=False)
    test_partitioned_lse_merge_and_block_backward()


def test_out_of_resources_relaunches_with_small_tiles(monkeypatch):
    """A GPU without the shared memory for the tuned tiles: the launch is redone with small tiles and a grid
    recomputed for them (forward and backward), so every row is still written."""
    import triton

    from longreach.kernels.flash import triton as tk

    real_run, failed = tk._run, set()

    def run_once_short_of_memory(kernel, grid, args, kw, tiles, warps, stages):
        # the interpreter's tuned tiles have 32 keys, its small ones 16: only the small ones "fit"
        if tiles.get("BLOCK_N", tiles.get("BLOCK_N1")) > 16:
            failed.add(kernel)
            raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
        real_run(kernel, grid, args, kw, tiles, warps, stages)

    monkeypatch.setattr(tk, "_run", run_once_short_of_memory)
    torch.manual_seed(9)
    check_against_reference(rand(1, 90, 4, 64), rand(1, 90, 2, 64), rand(1, 90, 2, 64), None)
    assert len(failed) >= 2  # the forward and a backward kernel took the fallback


def test_flash_non_causal():
    torch.manual_seed(2)
    check_against_reference(rand(1, 70, 2, 64), rand(1, 70, 2, 64), rand(1, 70, 2, 64), None, causal=False)


def test_partitioned_lse_merge_and_block_backward():
    """Two ring steps (diagonal 'causal' + earlier chunk 'full', with documents crossing the split) merged in
    fp32 equal the whole; their block backwards sum to the whole's gradients."""
    torch.manual_seed(3)
    s, h, d = 96, 48, 64
    cu = torch.tensor([0, 30, 70, 96], dtype=torch.int32)
    q, k, v = rand(s, 2, d), rand(s, 1, d), rand(s, 1, d)
    # clamp the global document boundaries to each chunk: doc i of q pairs with doc i of k
    cu_hi = (cu - h).clamp(0, s - h)
    cu_lo = cu.clamp(0, h)
    o1, l1 = flash_attention_block(q[h:], k[h:], v[h:], mask="causal", cu_seqlens_q=cu_hi, cu_seqlens_k=cu_hi)
    o2, l2 = flash_attention_block(q[h:], k[:h], v[:h], mask="full", cu_seqlens_q=cu_hi, cu_seqlens_k=cu_lo)
    assert o1.dtype == torch.float32 and l1.dtype == torch.float32
    lse = torch.logaddexp(l1, l2)  # [H, T]; -inf for rows without earlier keys is neutral
    w1, w2 = torch.exp(l1 - lse).T[..., None], torch.exp(l2 - lse).T[..., None]
    out = o1 * w1 + o2 * w2
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    o64, l64 = ref.attention_reference(q64, k64, v64, cu, cu, causal=True, scale=d ** -0.5)
    assert rel(lse, l64[:, h:]) < 1e-5
    assert rel(out, o64[h:]) < 1e-3
    do = torch.randn(s - h, 2, d)
    (o64[h:] * do.double()).sum().backward()
    g1 = flash_attention_block_backward(do, q[h:], k[h:], v[h:], out, lse, mask="causal", cu_seqlens_q=cu_hi,
                                        cu_seqlens_k=cu_hi)
    g2 = flash_attention_block_backward(do, q[h:], k[:h], v[:h], out, lse, mask="full", cu_seqlens_q=cu_hi,
                                        cu_seqlens_k=cu_lo)
    assert all(g.dtype == torch.float32 for g in g1 + g2)
    assert rel(g1[0] + g2[0], q64.grad[h:]) < 1e-3
    assert rel(torch.cat([g2[1], g1[1]]), k64.grad) < 1e-3
    assert rel(torch.cat([g2[2], g1[2]]), v64.grad) < 1e-3


def test_reference_fallback_matches_kernel(monkeypatch):
    """Without the interpreter, CPU calls fall back to the reference; same function as the kernel."""
    torch.manual_seed(4)
    q, k, v = (rand(1, 40, h, 64, dtype=torch.float32) for h in (2, 1, 1))
    o_kernel, l_kernel = flash_attention(q, k, v)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    o_ref, l_ref = flash_attention(q.cpu(), k.cpu(), v.cpu())
    tol = 1e-5 if DEV == "cpu" else 3e-3  # tf32 dots on GPU
    assert rel(o_kernel.cpu(), o_ref) < tol and rel(l_kernel.cpu(), l_ref) < tol


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        flash_attention(rand(1, 8, 3, 64), rand(1, 8, 2, 64), rand(1, 8, 2, 64))
    with pytest.raises(ValueError, match="head dim 48"):
        flash_attention(rand(1, 8, 2, 48), rand(1, 8, 2, 48), rand(1, 8, 2, 48))
    with pytest.raises(ValueError, match="cu_seqlens"):
        flash_attention(rand(8, 2, 64), rand(8, 2, 64), rand(8, 2, 64))
    with pytest.raises(ValueError, match="mask="):
        flash_attention_block(rand(1, 8, 2, 64), rand(1, 8, 2, 64), rand(1, 8, 2, 64), mask="diag")


def test_backward_takes_lse_as_a_strided_view():
    # the ring hands the backward slices of its lse ([Hq, T] viewed [:, h:]): delta must be indexed with lse's strides
    from longreach.kernels.flash import triton as tk

    torch.manual_seed(0)
    t, pad, hq, hkv, d = 48, 16, 4, 2, 32
    q, do = torch.randn(t, hq, d), torch.randn(t, hq, d)
    k, v = torch.randn(t, hkv, d), torch.randn(t, hkv, d)
    cu = torch.tensor([0, t], dtype=torch.int32)
    out, lse = tk.attention_forward(q, k, v, cu, cu, t, causal=True, scale=d ** -0.5, out_dtype=torch.float32)
    big = torch.full((hq, pad + t), float("nan"))
    big[:, pad:] = lse
    view = big[:, pad:]
    assert view.stride(0) != view.shape[1]
    kw = dict(causal=True, scale=d ** -0.5)
    want = tk.attention_backward(do, q, k, v, out, lse, cu, cu, t, t, **kw)
    got = tk.attention_backward(do, q, k, v, out, view, cu, cu, t, t, **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_gluon_backward_prep_delta_and_lse2():
    # the Gluon dk/dv kernel's inputs come from the Triton delta kernel (runs here in the interpreter)
    from longreach.kernels.flash import triton as tk

    g = tk._gluon("gluon_sm90_bwd")
    torch.manual_seed(0)
    t, hq, d = 70, 3, 64
    out, do = torch.randn(t, hq, d), torch.randn(t, hq, d)
    big = torch.randn(hq, t + 10)
    lse = big[:, 10:]
    lse[1, 5] = float("-inf")  # a row that saw no key
    delta, lse2 = g.prep(do, out, lse)
    assert delta.stride() == lse.stride() == lse2.stride()
    torch.testing.assert_close(delta, (out * do).sum(-1).t())
    want = lse * 1.4426950408889634
    want[1, 5] = float("inf")
    torch.testing.assert_close(lse2, want)
