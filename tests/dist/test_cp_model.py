"""Model level: a tiny Llama trained 3 SGD steps under CP (ring, Ulysses, hybrid, and dp x cp) through the
``shard_fn`` hook matches the single-process model with 'dense' attention on the same global batch:
per-step losses to 1e-5 (fp32) and gradients close. Exercises labels/positions after zigzag (row-wide and
per-document layouts), padding of odd lengths, packed documents and the global real-token loss normalisation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from cp_harness import spawn
from longreach.data.batch import Batch
from longreach.models.llama import LlamaForCausalLM, ModelArgs
from longreach.parallel.mesh import build_mesh
from longreach.parallel.plan import make_shard_fn, rank_loss

pytestmark = pytest.mark.dist

ARGS = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
STEPS, LR = 3, 0.5


def _global_batch(rows: int, s: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ARGS["vocab_size"], (rows, s), generator=g)
    cuts, pos, labels = [0], torch.zeros(rows, s, dtype=torch.long), torch.full((rows, s), -100)
    for r in range(rows):
        inner = sorted(set(torch.randint(1, s, (2,), generator=g).tolist()))
        bounds = [0] + inner + [s]
        for a, e in zip(bounds[:-1], bounds[1:]):
            pos[r, a:e] = torch.arange(e - a)
            labels[r, a:e - 1] = ids[r, a + 1:e]
        cuts += [r * s + b for b in bounds[1:]]
    return Batch(ids, labels, pos, torch.tensor(cuts, dtype=torch.int32))


def _model(attention: str) -> LlamaForCausalLM:
    m = LlamaForCausalLM(ModelArgs(**ARGS), attention=attention)
    return m.init_weights(generator=torch.Generator().manual_seed(0))


def _reference(batch: Batch):
    m = _model("dense")
    opt = torch.optim.SGD(m.parameters(), lr=LR)
    losses, grads = [], None
    for step in range(STEPS):
        total, n = m.loss_sum(batch.input_ids, batch.labels, batch.position_ids, batch.attn_context())
        loss = total / n
        opt.zero_grad()
        loss.backward()
        if step == 0:
            grads = {k: p.grad.clone() for k, p in m.named_parameters()}
        opt.step()
        losses.append(float(loss.detach()))
    return losses, grads


def _check_mesh(mesh):
    """Rank layout (dp, ring, ulysses) row-major; the dp and cp groups the trainer hands DeepSpeed."""
    ranks = dist.get_process_group_ranks
    r, cp, u = mesh.rank, mesh.cp, mesh.ulysses
    assert ranks(mesh.cp_group) == list(range(mesh.dp_rank * cp, (mesh.dp_rank + 1) * cp))
    assert ranks(mesh.ulysses_group) == list(range(r - r % u, r - r % u + u))
    assert ranks(mesh.ring_group) == [mesh.dp_rank * cp + i * u + mesh.ulysses_rank for i in range(mesh.ring)]
    assert ranks(mesh.dp_group) == [d * cp + mesh.cp_rank for d in range(mesh.dp)]
    assert ranks(mesh.dp_cp_group) == list(range(mesh.world_size))


def _worker(rank, world, outdir, configs):
    rows_per_dp, s = 2, 37
    report = {}
    for strategy, cp, uly, layout in configs:
        mesh = build_mesh(cp=cp, ulysses=uly, strategy=strategy)
        _check_mesh(mesh)
        batch = _global_batch(rows_per_dp * mesh.dp, s, seed=11)
        ref_losses, ref_grads = _reference(batch)
        mine = slice(mesh.dp_rank * rows_per_dp, (mesh.dp_rank + 1) * rows_per_dp)
        cu = torch.tensor([0] + [c - mine.start * s for c in batch.cu_seqlens.tolist()
                                  if mine.start * s < c <= mine.stop * s], dtype=torch.int32)
        dp_batch = Batch(batch.input_ids[mine], batch.labels[mine], batch.position_ids[mine], cu)
        local, ctx = make_shard_fn(mesh, layout=layout)(dp_batch)
        assert ctx.parallel.layout == (layout if mesh.ring > 1 else "global")
        m = _model(strategy)
        opt = torch.optim.SGD(m.parameters(), lr=LR)
        losses = []
        for step in range(STEPS):
            total, n = m.loss_sum(local.input_ids, local.labels, local.position_ids, ctx)
            loss = rank_loss(total, n, group=mesh.dp_cp_group)  # this rank's share of the global mean
            opt.zero_grad()
            loss.backward()
            for p in m.parameters():  # what DeepSpeed does over the sequence-data-parallel group (sum of shares)
                dist.all_reduce(p.grad, group=mesh.dp_cp_group)
            if step == 0:
                for k, p in m.named_parameters():
                    torch.testing.assert_close(p.grad, ref_grads[k], atol=2e-5, rtol=1e-4,
                                               msg=lambda msg: f"{strategy} cp={cp} U={uly} {layout} grad {k}: {msg}")
            opt.step()
            lsum = loss.detach().clone()
            dist.all_reduce(lsum, group=mesh.dp_cp_group)
            losses.append(float(lsum))
        diff = max(abs(a - b) for a, b in zip(losses, ref_losses))
        assert diff <= 1e-5, f"{strategy} cp={cp} U={uly} {layout}: losses {losses} vs single-process {ref_losses}"
        report[f"{strategy} dp={mesh.dp} cp={cp} U={uly} {layout}"] = {"losses": losses, "ref": ref_losses,
                                                                       "max_diff": diff}
    if rank == 0:
        with open(f"{outdir}/model_{world}.json", "w") as f:
            json.dump(report, f)


@pytest.mark.parametrize("world,configs", [
    (2, [("ring", 2, 1, "global"), ("ring", 2, 1, "per_doc"), ("ulysses", 2, 2, "global")]),
    # ring cp=2 at world 4 is dp=2 x cp=2
    (4, [("hybrid", 4, 2, "per_doc"), ("ring", 2, 1, "global"), ("ring", 2, 1, "per_doc"), ("ulysses", 4, 4, "global")]),
])
def test_cp_model_matches_single_process(world, configs, tmp_path):
    spawn(_worker, world, str(tmp_path), configs)
    print((tmp_path / f"model_{world}.json").read_text())
