"""State-passing context parallelism for (hybrid) linear attention on gloo: worlds 1-4, contiguous and
zigzag chunk orders, windows shorter and longer than a chunk, one document per row and packed documents
(starting at a chunk start, one token long, spanning chunks and ranks); outputs and gradients equal the
single-process result (documents run one by one) to fp64 precision. Model level (worlds 2-4: ulysses, ring,
hybrid): a tiny Llama with softmax and linear layers under the trainer's one shard plan, packed documents and
padding, forward+backward equals the single process."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _orders(world: int):
    return {"contiguous": ([[r] for r in range(world)], world),
            "zigzag": ([[r, 2 * world - 1 - r] for r in range(world)], 2 * world)}


def _shard(x: torch.Tensor, ids, n: int) -> torch.Tensor:
    # x [B, S, ...] -> this rank's chunks, concatenated in local order
    chunks = x.chunk(n, dim=1)
    return torch.cat([chunks[i] for i in ids], dim=1)


def _grads(loss, xs):
    # raw q/k are unused without a window: their gradient is zero
    gs = torch.autograd.grad(loss, xs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(xs, gs)]


def _doc_ids(s: int, length: int, g: torch.Generator) -> torch.Tensor:
    """int64 [2, s] document ids: row 0 has a document starting exactly at a chunk start, a one-token document and
    a document spanning the rest (several chunks and ranks); row 1 random starts."""
    rows = []
    for r in range(2):
        if r == 0:
            starts = {t for t in (0, length, length + 1, length + 2) if t < s}
        else:
            starts = {0, *torch.randint(1, s, (max(1, s // 6),), generator=g).tolist()}
        flags = torch.zeros(s, dtype=torch.long)
        flags[sorted(starts)] = 1
        rows.append(torch.cumsum(flags, 0) - 1)
    return torch.stack(rows)


def _reference(xs, doc, window: int):
    """Single process: every document of every row on its own (the state resets at document starts)."""
    from longreach.kernels.linear_attention.hybrid import hybrid_parts

    if doc is None:
        p = hybrid_parts(*xs, window=window, scale=0.4)
        return p.num / (p.den[..., None] + 1e-6)
    rows = []
    for b in range(doc.shape[0]):
        bounds = [0, *(torch.nonzero(doc[b, 1:] != doc[b, :-1]).flatten() + 1).tolist(), doc.shape[1]]
        outs = []
        for a, e in zip(bounds[:-1], bounds[1:]):
            p = hybrid_parts(*(x[b:b + 1, a:e] for x in xs), window=window, scale=0.4)
            outs.append(p.num / (p.den[..., None] + 1e-6))
        rows.append(torch.cat(outs, 1))
    return torch.cat(rows, 0)


def _check_function(rank: int, world: int, group) -> None:
    from longreach.parallel.linear_cp import hybrid_attention_cp

    for layout, (assign, n) in _orders(world).items():
        length = 5  # tokens per chunk (odd, so nothing is aligned)
        for window in (0, 3, 2 * length + 1):
            for docs in (False, True):
                g = torch.Generator().manual_seed(1000 * world + window + 7 * docs)
                s = n * length
                mk = lambda *sh: torch.randn(*sh, generator=g, dtype=torch.float64)  # noqa: E731
                q, k, v = mk(2, s, 4, 8), mk(2, s, 2, 8), mk(2, s, 2, 8)
                fq, fk = mk(2, s, 4, 6).exp(), mk(2, s, 2, 6).exp()  # positive features
                wts = mk(2, s, 4, 8)
                doc = _doc_ids(s, length, g) if docs else None
                full = [x.clone().requires_grad_() for x in (q, k, v, fq, fk)]
                ref = _reference(full, doc, window)
                ref_g = _grads((ref * wts).sum(), full)
                ids = assign[rank]
                loc = [_shard(x, ids, n).clone().requires_grad_() for x in (q, k, v, fq, fk)]
                # with documents, also the plan's path: every rank's chunk ids given, no id gather
                out = hybrid_attention_cp(*loc, window=window, scale=0.4, eps=1e-6, group=group, chunk_ids=ids,
                                          num_chunks=n, doc_ids=doc,
                                          all_chunk_ids=tuple(tuple(a) for a in assign) if docs else None)
                msg = f"world={world} {layout} window={window} docs={docs} rank={rank}"
                torch.testing.assert_close(out, _shard(ref, ids, n), rtol=1e-10, atol=1e-12, msg=msg)
                grads = _grads((out * _shard(wts, ids, n)).sum(), loc)
                for name, a, b in zip("q k v fq fk".split(), grads, ref_g):
                    torch.testing.assert_close(a, _shard(b, ids, n), rtol=1e-10, atol=1e-12, msg=f"d{name} {msg}")


MODEL_STRATEGY = {2: ("ulysses", 2), 3: ("ring", 1), 4: ("hybrid", 2)}
"""world -> (softmax strategy, ulysses degree) of the model-level check: every split of ring x ulysses."""


def _check_model(rank: int, world: int) -> None:
    """A tiny fp64 Llama with linear and softmax layers under ONE shard plan (the trainer's ``make_shard_fn`` on a
    real mesh): packed documents spanning chunks and ranks, an odd length (padded), forward+backward equal the
    single process with 'dense' softmax and per-document linear attention."""
    from longreach.data.batch import Batch
    from longreach.models.llama import LlamaForCausalLM, ModelArgs
    from longreach.parallel.mesh import build_mesh
    from longreach.parallel.plan import make_shard_fn

    strategy, uly = MODEL_STRATEGY[world]
    mesh = build_mesh(cp=world, ulysses=uly, strategy=strategy)
    args = ModelArgs(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, torch_dtype="float64")
    opts = [{"feature_map": "hedgehog", "window": 3, "feature_dim": 4}, None, {"feature_map": "elu", "window": 0}]

    def model(softmax: str):
        m = LlamaForCausalLM(args, ["linear", softmax, "linear"], opts).double()
        return m.init_weights(generator=torch.Generator().manual_seed(0))

    g = torch.Generator().manual_seed(1)
    b, s = 2, 8 * world + 3  # never a multiple of 2 * cp: the plan pads
    ids = torch.randint(0, 64, (b, s), generator=g)
    pos, labels, cuts = torch.zeros(b, s, dtype=torch.long), torch.full((b, s), -100), [0]
    for r in range(b):
        bounds = [0, *sorted(set(torch.randint(1, s, (3,), generator=g).tolist())), s]
        for a, e in zip(bounds[:-1], bounds[1:]):
            pos[r, a:e] = torch.arange(e - a)
            labels[r, a:e - 1] = ids[r, a + 1:e]
        cuts += [r * s + x for x in bounds[1:]]
    batch = Batch(ids, labels, pos, torch.tensor(cuts, dtype=torch.int32))
    ref = model("dense")
    loss1, n1 = ref.loss_sum(ids, labels, pos, batch.attn_context())
    ref_grads = torch.autograd.grad(loss1, list(ref.parameters()))

    local, ctx = make_shard_fn(mesh)(batch)
    m = model(strategy)
    loss, n = m.loss_sum(local.input_ids, local.labels, local.position_ids, ctx)
    grads = torch.autograd.grad(loss, list(m.parameters()))
    total = torch.stack([loss.detach(), n.to(loss.dtype)])
    dist.all_reduce(total, group=mesh.cp_group)
    # loss_sum takes the logits to fp32 for the cross-entropy, so model-level agreement is fp32-tight, not fp64
    msg = f"world={world} strategy={strategy} U={uly} rank={rank}"
    torch.testing.assert_close(total, torch.stack([loss1.detach(), n1.to(loss1.dtype)]), rtol=1e-6, atol=1e-6,
                               msg=msg)
    for (name, _), a, r in zip(m.named_parameters(), grads, ref_grads):
        a = a.clone()
        dist.all_reduce(a, group=mesh.cp_group)
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-7, msg=f"grad {name} {msg}")


def _worker(rank: int, world: int, port: int) -> None:
    # the plain-torch chunked kernel (what CPU runs outside tests): the Triton kernel's state in/out is tested in
    # tests/kernels, and its interpreter (conftest's TRITON_INTERPRET=1) would cost minutes across these cases
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        group = dist.new_group(list(range(world)))
        _check_function(rank, world, group)
        if world > 1:
            _check_model(rank, world)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_linear_cp_matches_single_process(world):
    mp.spawn(_worker, args=(world, _free_port()), nprocs=world, join=True)
