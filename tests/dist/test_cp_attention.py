"""The CP attention op (ring, Ulysses, hybrid) on 1-4 gloo ranks against single-process references.

Exact backend: fp64 local attention, out/lse/dq/dk/dv equal the dense fp64 reference to 1e-12.
Low precision: bf16 error vs fp64 at most 2x single-process bf16 attention's error, at each world size.
Communication: collectives per forward and backward are exactly what the schedule says.
Bad input: head counts Ulysses cannot split raise on every rank (no hang).
"""

from __future__ import annotations

import json

import pytest
import torch

from cp_harness import spawn
from cp_reference import dense_reference, random_cu_seqlens
from longreach.attention.context import AttnContext
from longreach.attention.dense import dense_attention
from longreach.parallel.comm_count import Comm
from longreach.parallel.hybrid import cp_attention
from longreach.parallel.mesh import build_mesh
from longreach.parallel.plan import ShardPlan

pytestmark = pytest.mark.dist


def _strategies(world):
    out = [("ring", 1), ("ulysses", world)]
    if world == 4:
        out.append(("hybrid", 2))
    if world == 2:
        out.append(("hybrid", 2))
    return out


def _heads(world):
    return [(3, 3), (6, 3)] if world == 3 else [(4, 4), (4, 2), (8, 1)]


def _inputs(b, s, hq, hkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(b, s, h, d, generator=g, dtype=torch.float64)
    q, k, v, dout = mk(hq), mk(hkv), mk(hkv), mk(hq)
    return [x.to(dtype).to(torch.float64) for x in (q, k, v)] + [dout.to(dtype).to(torch.float64)]


def _expected_counts(ring, uly, return_lse):
    fwd = {"p2p_batch": ring - 1 if ring > 1 else 0, "all_to_all": (4 if return_lse else 3) if uly > 1 else 0}
    bwd = {"p2p_batch": 2 * ring - 1 if ring > 1 else 0, "all_to_all": 3 if uly > 1 else 0}
    return ({k: v for k, v in fwd.items() if v}, {k: v for k, v in bwd.items() if v})


def _run_cp(mesh, plan, q, k, v, dout, causal, dtype, comm):
    info = plan.attn_info(strategy=mesh.strategy, ring_group=mesh.ring_group, ulysses_group=mesh.ulysses_group, comm=comm)
    ql, kl, vl = (plan.shard(x).to(dtype).requires_grad_() for x in (q, k, v))
    comm.reset()
    out, lse = cp_attention(ql, kl, vl, info=info, causal=causal, return_lse=True)
    fwd = dict(comm.counts)
    comm.reset()
    out.backward(plan.shard(dout).to(dtype))
    bwd = dict(comm.counts)
    return out, lse, ql.grad, kl.grad, vl.grad, fwd, bwd


def _exact_worker(rank, world, outdir):
    b, d = 2, 8
    errs = {}
    for strategy, uly in _strategies(world):
        mesh = build_mesh(cp=world, ulysses=uly, strategy=strategy)
        comm = Comm()
        for hq, hkv in _heads(world):
            # packed cases run under both layouts: one zigzag over the row, and one per document
            for causal, packed, s, layout in ((True, False, 48, "global"), (True, True, 37, "global"),
                                              (True, True, 37, "per_doc"), (False, True, 45, "per_doc")):
                q, k, v, dout = _inputs(b, s, hq, hkv, d, torch.float64, seed=s + hq)
                cu = random_cu_seqlens(b, s, torch.Generator().manual_seed(s)) if packed else None
                qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
                ref, ref_lse = dense_reference(qr, kr, vr, causal=causal, cu_seqlens=cu)
                ref.backward(dout)
                plan = ShardPlan(batch_size=b, seq_len=s, ring=mesh.ring, ulysses=mesh.ulysses, ring_rank=mesh.ring_rank,
                                 ulysses_rank=mesh.ulysses_rank, cu_seqlens=cu, layout=layout)
                assert plan.layout == (layout if mesh.ring > 1 else "global")
                out, lse, dq, dk, dv, fwd, bwd = _run_cp(mesh, plan, q, k, v, dout, causal, torch.float64, comm)
                real = plan.token_index() < s  # [B, S_local]: pad tokens are not in the reference
                name = (f"W={world} {strategy} U={uly} hq={hq} hkv={hkv} causal={causal} packed={packed} S={s} "
                        f"layout={layout}")
                for t, got, want, dim in (("out", out, ref, 1), ("lse", lse, ref_lse.transpose(1, 2), 1),
                                          ("dq", dq, qr.grad, 1), ("dk", dk, kr.grad, 1), ("dv", dv, vr.grad, 1)):
                    got = got.transpose(1, 2) if t == "lse" else got
                    torch.testing.assert_close(got[real], plan.shard(want)[real], atol=1e-12, rtol=0,
                                               msg=lambda m: f"{name} {t}: {m}")
                    errs[f"{name} {t}"] = float((got.detach()[real] - plan.shard(want.detach())[real]).abs().max())
                want_fwd, want_bwd = _expected_counts(mesh.ring, mesh.ulysses, return_lse=True)
                assert fwd == want_fwd, f"{name}: forward collectives {fwd}, schedule says {want_fwd}"
                assert bwd == want_bwd, f"{name}: backward collectives {bwd}, schedule says {want_bwd}"
    if rank == 0:
        with open(f"{outdir}/exact_{world}.json", "w") as f:
            json.dump({"max_err": max(errs.values()), "cases": len(errs)}, f)


def _bf16_worker(rank, world, outdir):
    b, s, hq, hkv, d = 1, 128, 4, 2, 16
    if world == 3:
        hq, hkv = 6, 3
    q, k, v, dout = _inputs(b, s, hq, hkv, d, torch.bfloat16, seed=7)
    cu = random_cu_seqlens(b, s, torch.Generator().manual_seed(5))
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    ref, _ = dense_reference(qr, kr, vr, causal=True, cu_seqlens=cu)
    ref.backward(dout)
    # single-process bf16 baseline: torch SDPA per document (longreach 'dense')
    qb, kb, vb = (x.to(torch.bfloat16).requires_grad_() for x in (q, k, v))
    base = dense_attention(qb, kb, vb, ctx=AttnContext(causal=True, cu_seqlens=cu))
    base.backward(dout.to(torch.bfloat16))
    report = {}
    for strategy, uly in _strategies(world):
        mesh = build_mesh(cp=world, ulysses=uly, strategy=strategy)
        plan = ShardPlan(batch_size=b, seq_len=s, ring=mesh.ring, ulysses=mesh.ulysses, ring_rank=mesh.ring_rank,
                         ulysses_rank=mesh.ulysses_rank, cu_seqlens=cu)
        out, _, dq, dk, dv, _, _ = _run_cp(mesh, plan, q, k, v, dout, True, torch.bfloat16, Comm())
        real = plan.index() < s
        for t, got, bl, want in (("out", out, base, ref), ("dq", dq, qb.grad, qr.grad), ("dk", dk, kb.grad, kr.grad),
                                 ("dv", dv, vb.grad, vr.grad)):
            want_l = plan.shard(want)[:, real]
            cp_err = (got.detach()[:, real].double() - want_l).abs().max()
            base_err = (plan.shard(bl.detach().double())[:, real] - want_l).abs().max()
            # compare over the whole sequence: gather both maxima over the CP group
            errs = torch.stack([cp_err, base_err])
            torch.distributed.all_reduce(errs, op=torch.distributed.ReduceOp.MAX)
            report[f"{strategy} U={uly} {t}"] = [float(errs[0].detach()), float(errs[1].detach())]
            assert errs[0] <= 2 * errs[1], f"W={world} {strategy} {t}: bf16 CP error {errs[0]:.3g} > 2x single-process {errs[1]:.3g}"
    if rank == 0:
        with open(f"{outdir}/bf16_{world}.json", "w") as f:
            json.dump(report, f)


def _bad_input_worker(rank, world, outdir):
    mesh = build_mesh(cp=world, ulysses=world, strategy="ulysses")
    plan = ShardPlan(batch_size=1, seq_len=16, ring=1, ulysses=world, ring_rank=0, ulysses_rank=mesh.ulysses_rank)
    info = plan.attn_info(strategy="ulysses", ring_group=None, ulysses_group=mesh.ulysses_group, comm=Comm())
    x = lambda h: torch.randn(1, plan.local_len, h, 8)
    with pytest.raises(ValueError, match=r"parallel.ulysses=2 does not divide the model's 3 attention heads"):
        cp_attention(x(3), x(3), x(3), info=info, causal=True)
    with pytest.raises(ValueError, match="neither divide"):
        cp_attention(x(6), x(3), x(3), info=info, causal=True)
    with pytest.raises(ValueError, match="same ShardPlan"):
        cp_attention(torch.randn(1, 5, 4, 8), torch.randn(1, 5, 4, 8), torch.randn(1, 5, 4, 8), info=info, causal=True)
    assert info.comm.counts == {}, "a refused call must not have communicated"


def _all_worker(rank, world, outdir):
    # one spawn per world size runs every check: process start-up dominates the runtime on a shared CPU
    _exact_worker(rank, world, outdir)
    _bf16_worker(rank, world, outdir)
    if world == 2:
        _bad_input_worker(rank, world, outdir)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_cp_attention_exact_bf16_comm_counts(world, tmp_path):
    """fp64 exactness (1e-12), bf16 error <= 2x single-process, collective counts; at W=2 also bad head counts."""
    spawn(_all_worker, world, str(tmp_path))
    res = json.loads((tmp_path / f"exact_{world}.json").read_text())
    print(f"world {world}: {res['cases']} tensors, max |err| {res['max_err']:.2e}")
    print(f"world {world} bf16 [cp_err, single_err]:", (tmp_path / f"bf16_{world}.json").read_text())
