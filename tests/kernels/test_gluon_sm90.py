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
                                            "bwd_s2", "bwd_d64_accumulate", "bwd_noncausal"}
    for x in rows:
        assert x["spill_st"] == 0 and x["spill_ld"] == 0, x
        # local memory: none, except (dk/dv, Triton 3.6 and 3.9) the thread id that ptxas parks across the
        # partitions' register reallocation: one store, reloaded by the consumers
        assert x["stl"] <= (1 if x["variant"].startswith("bwd") else 0), x
        assert x["ldl"] == 0 or x["variant"].startswith("bwd"), x
        assert x["notes"] == [], x  # e.g. C7514/C7515: ptxas serialised the wgmmas
        assert x["hgmma"] > 0 and x["utmaldg"] > 0, x
        assert x["smem"] <= 227 * 1024, x  # the H100/H200 per-block limit
