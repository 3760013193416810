"""The Gluon sm_90 forward and dk/dv kernels (longreach/kernels/flash/gluon_sm90*.py) cannot run without a Hopper
GPU; on CPU we check when they apply and that they compile for sm_90a without spills or serialised wgmmas (ptxas, no
GPU needed). Their results are checked on the GPU by ``longreach bench kernels --check`` (check_sm90_forward,
check_sm90_backward) against the Triton kernels and an fp32 reference."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_why_not_names_the_reason():
    from longreach.kernels.flash import triton as tk

    g = tk._gluon()
    if g is None:
        pytest.fail("triton.experimental.gluon did not import: the sm_90 forward would never run")
    x = torch.zeros(16, 2, 128, dtype=torch.bfloat16)
    assert "compute capability 9" in g.why_not(x, x, x, None, 1)


def test_interpreter_and_cpu_never_take_the_gluon_path(monkeypatch):
    from longreach.kernels.flash import triton as tk

    called = []
    g = tk._gluon()
    monkeypatch.setattr(g, "attention_forward_into", lambda *a, **k: called.append(1))
    q = torch.randn(40, 4, 64, dtype=torch.bfloat16)
    k = torch.randn(40, 2, 64, dtype=torch.bfloat16)
    cu = torch.tensor([0, 40], dtype=torch.int32)
    out, lse = tk.attention_forward(q, k, k, cu, cu, 40, causal=True, scale=0.125, out_dtype=q.dtype)
    assert not called and out.shape == q.shape and torch.isfinite(lse).all()


def test_bwd_why_not_names_the_reason():
    from longreach.kernels.flash import triton as tk

    g = tk._gluon("gluon_sm90_bwd")
    if g is None:
        pytest.fail("the Gluon dk/dv module did not import: the sm_90 backward would never use it")
    x = torch.zeros(16, 2, 128, dtype=torch.bfloat16)
    assert "compute capability 9" in g.why_not(x, x, x, x, torch.zeros(2, 16), None)


def test_interpreter_and_cpu_backward_never_take_the_gluon_path(monkeypatch):
    from longreach.kernels.flash import triton as tk

    called = []
    g = tk._gluon("gluon_sm90_bwd")
    monkeypatch.setattr(g, "dkdv_into", lambda *a, **k: called.append(1))
    monkeypatch.setattr(g, "prep", lambda *a, **k: called.append(1))
    q = torch.randn(40, 4, 64, dtype=torch.bfloat16)
    k = torch.randn(40, 2, 64, dtype=torch.bfloat16)
    cu = torch.tensor([0, 40], dtype=torch.int32)
    out, lse = tk.attention_forward(q, k, k, cu, cu, 40, causal=True, scale=0.125, out_dtype=q.dtype)
    dq, dk, dv = tk.attention_backward(torch.randn_like(q), q, k, k, out, lse, cu, cu, 40, 40, causal=True,
                                       scale=0.125)
    assert not called and torch.isfinite(dk.float()).all() and dk.abs().sum() > 0


def test_compiles_for_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    path = tmp_path / "stats.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "kernel_stats.py"), "--gluon", "--json",
                        str(path)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(path.read_text())
    assert {x["variant"] for x in rows} == {"dense", "s2_pack4", "d64_accumulate", "noncausal_pack8", "bwd_dense",
                                            "bwd_s2", "bwd_d64_accumulate", "bwd_noncausal", "bwd_dq_dense",
                                            "bwd_dq_s2", "bwd_dq_d64_accumulate", "bwd_dq_chunked",
                                            "bwd_dq_s2_chunked"}
    for x in rows:
        if x["variant"].startswith("bwd_dq") and x["variant"] != "bwd_dq_d64_accumulate":
            # dq added in (D 128): loop-invariant shared-memory addresses spilled (<= 128 B per thread) and
            # reloaded each step from L1, which keeps room for them: shared memory within the 196 KB carve-out
            assert x["spill_st"] <= 128 and x["smem"] <= 196 * 1024, x
        elif x["variant"].startswith("bwd"):
            assert x["spill_st"] == 0 and x["spill_ld"] == 0, x
            # local memory: none, except (Triton 3.6 and 3.9) the thread id that ptxas parks across the partitions'
            # register reallocation: one store, reloaded by the consumers
            assert x["stl"] <= 1, x
        else:
            # the forward, Q held in registers (Q_RS): Triton 3.6 (the GPU image) spilled 12 B in the dense variant
            # (bench/results/gluon_fwd_qrs_stats_triton36_2026-12-04.json), none since the masked tile goes first
            # (MASK_FIRST); 3.9 has parked up to 104 B of scalars (tile bookkeeping) in local memory, reloaded from
            # L1. More means Q_RS no longer fits the 240 consumer registers
            assert x["spill_st"] <= 128 and x["spill_ld"] <= 128, x
        assert x["notes"] == [], x  # e.g. C7514/C7515: ptxas serialised the wgmmas
        assert x["hgmma"] > 0 and x["utmaldg"] > 0, x
        assert x["smem"] <= 227 * 1024, x  # the H100/H200 per-block limit


@pytest.mark.parametrize("ring,s2", [(False, False), (True, False), (False, True), (True, True)])
def test_fused_dq_chunks_cover_each_q_row_once(monkeypatch, ring, s2):
    """The host side of the fused-dq backward on a long sequence (dense, past FUSED_DQ_MAX_BYTES of fp32 dq: chunks
    of FUSED_DQ_CHUNK_BYTES; S2: of S2_BWD_CHUNK rows): q rows in chunks (one dkdv_into each), dk/dv summed in fp32 and copied out, dq added
    into its fp32 buffer. A stand-in dkdv_into adds the exact (fp64 reference) gradients of its chunk's q rows, so
    the sum over the chunks equals the whole only if the chunks tile [0, T)."""
    from longreach.kernels.flash import reference as ref
    from longreach.kernels.flash import triton as tk
    from longreach.kernels.s2 import S2Pattern
    from longreach.kernels.s2.triton import sparse_args

    t, hq, hkv, d, sc = 300, 4, 2, 64, 0.125
    torch.manual_seed(0)
    q = torch.randn(t, hq, d, dtype=torch.bfloat16)
    k, v = (torch.randn(t, hkv, d, dtype=torch.bfloat16) for _ in range(2))
    do = torch.randn_like(q)
    cu = torch.tensor([0, t], dtype=torch.int32)
    qf, kf, vf = (x.double().requires_grad_() for x in (q, k, v))
    o, _ = ref.attention_reference(qf, kf, vf, cu, cu, causal=True, scale=sc)
    want = torch.autograd.grad((o * do.double()).sum(), (qf, kf, vf))
    ranges = []

    class FakeGluon:
        @staticmethod
        def why_not(*a):
            return None

        @staticmethod
        def prep(do_, out_, lse_):
            return torch.zeros_like(lse_), torch.zeros_like(lse_)

        dq_buffer_ok = staticmethod(lambda x: x.dtype == torch.float32 and x.is_contiguous())

        @staticmethod
        def dkdv_into(do_, q_, k_, v_, delta, lse2, cu_q, cu_k, max_k, dense, sp, dk, dv, *, causal, scale, sparse,
                      accumulate, dq=None, q_range=None):
            assert accumulate and dk.dtype == torch.float32 and dq is not None and q_range is not None
            assert sparse == s2
            lo, hi = q_range
            ranges.append(q_range)
            a, b, c = (x.double().requires_grad_() for x in (q_, k_, v_))
            o_, _ = ref.attention_reference(a, b, c, cu_q, cu_k, causal=causal, scale=scale)
            g = torch.autograd.grad((o_[lo:hi] * do_[lo:hi].double()).sum(), (a, b, c))
            dq += g[0].float()
            dk += g[1].float()
            dv += g[2].float()
            return True

    monkeypatch.setattr(tk, "INTERPRET", False)
    monkeypatch.setattr(tk, "_gluon", lambda name="gluon_sm90": FakeGluon)
    if s2:  # S2's own chunk size applies (not the dense one's) from S2_BWD_CHUNK_FROM rows on
        monkeypatch.setattr(tk, "S2_BWD_CHUNK", 128)
        monkeypatch.setattr(tk, "S2_BWD_CHUNK_FROM", 256)
    else:
        monkeypatch.setattr(tk, "FUSED_DQ_MAX_BYTES", 256 * hq * d * 4)  # one launch up to 256 q rows
        monkeypatch.setattr(tk, "FUSED_DQ_CHUNK_BYTES", 128 * hq * d * 4)  # past that, chunks of 128
    out = torch.zeros_like(q)
    lse = torch.zeros(hq, t)
    acc = tuple(torch.full(x.shape, 0.5) for x in (q, k, v)) if ring else None
    sp = sparse_args(S2Pattern(64, 128, 64, 2), hkv, "cpu") if s2 else None
    got = tk.attention_backward(do, q, k, v, out, lse, cu, cu, t, t, causal=True, scale=sc, acc=acc, sparse=sp)
    assert ranges == [(0, 128), (128, 256), (256, 384)]
    for g, w in zip(got, want):
        assert g.dtype == (torch.float32 if ring else torch.bfloat16)
        w = w + 0.5 if ring else w
        assert ((g.double() - w).norm() / w.norm()).item() < (1e-5 if ring else 1e-2)
