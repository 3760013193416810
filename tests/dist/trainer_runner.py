"""Runs tiny Trainer jobs for the trainer tests; launched by torchrun (or plain python for one process).

Usage: python trainer_runner.py SPEC.json   where SPEC is {"runs": [run, ...]} and each run is
{"out": dir, "name": str, "overrides": ["train.steps=3", ...], "mode": "dp" | "sp" | "ref",
 "rows": rows per global micro-batch, "nan_call": k (optional), "kill_after_step": k (optional)}.
Rank 0 writes <out>/<name>/result.json with the per-step metrics.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

SEQ = 16
VOCAB = 128


def tiny_model(seed: int = 0):
    from longreach.models.llama import LlamaForCausalLM, ModelArgs

    args = ModelArgs(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    return LlamaForCausalLM(args).init_weights(generator=torch.Generator().manual_seed(seed))


class NaNModel:
    """Mixin factory: a tiny model whose loss_sum returns NaN on its k-th call (1-based)."""

    @staticmethod
    def build(nan_call: int, seed: int = 0):
        model = tiny_model(seed)
        orig = model.loss_sum
        calls = {"n": 0}

        def loss_sum(*a, **kw):
            calls["n"] += 1
            total, count = orig(*a, **kw)
            return (total * float("nan") if calls["n"] == nan_call else total), count

        model.loss_sum = loss_sum  # instance attribute on a test model (not a library patch)
        return model


def global_rows(step_micro: int, rows: int, seed: int = 0):
    """Rows of the global micro-batch number ``step_micro``: ids, shifted labels with a different number of
    real tokens per row (so ranks hold different token counts), positions."""
    from longreach.data.batch import Batch

    g = torch.Generator().manual_seed(seed * 100003 + step_micro)
    ids = torch.randint(0, VOCAB, (rows, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (rows, SEQ), generator=g)
    for r in range(rows):
        real = 2 + int(torch.randint(0, SEQ - 2, (1,), generator=g))
        labels[r, real:] = -100
    pos = torch.arange(SEQ).expand(rows, SEQ).clone()
    return Batch(ids, labels, pos)


def take_rows(b, idx):
    from longreach.data.batch import Batch

    return Batch(b.input_ids[idx], b.labels[idx], b.position_ids[idx])


def batch_stream(mode: str, rows: int, rank: int, world: int, grad_accum: int = 1, repeat: int = 0):
    """Micro-batches for this rank. Step s uses the ``rows`` rows of ``global_rows(s)``, cut into grad_accum
    micro-batches; 'dp': each micro-batch's rows are further split across ranks; 'sp': every rank reads the
    whole micro-batch (the shard_fn cuts it); 'ref': one process. ``repeat`` > 0 cycles through that many
    distinct steps of data (to watch a loss fall)."""
    s = 0
    while True:
        b = global_rows(s % repeat if repeat else s, rows)
        pieces = grad_accum * (world if mode == "dp" else 1)
        per = rows // pieces
        for j in range(grad_accum):
            k = j * world + rank if mode == "dp" else j
            yield take_rows(b, slice(k * per, (k + 1) * per))
        s += 1


def sp_shard(rank: int, world: int):
    def shard(b):
        per = b.input_ids.shape[0] // world
        local = take_rows(b, slice(rank * per, (rank + 1) * per))
        return local, local.attn_context()

    return shard


def run_one(spec: dict, dist) -> list[dict]:
    import torch.distributed as tdist

    from longreach.launch.config import load_config
    from longreach.launch.trainer import Trainer

    cfg = load_config(overrides=[f"out_dir={spec['out']}", f"name={spec['name']}", "tracking.wandb=false",
                                 "tracking.progress=false", *spec.get("overrides", [])])
    model = NaNModel.build(spec["nan_call"]) if spec.get("nan_call") else tiny_model()
    mode = spec.get("mode", "dp")
    kw = {}
    if mode == "sp":
        singles = [tdist.new_group([r]) for r in range(dist.world)]
        kw = dict(dp_group=singles[dist.rank], sp_group=tdist.group.WORLD, shard_fn=sp_shard(dist.rank, dist.world))
    kill = spec.get("kill_after_step")

    def on_ckpt(step, path):
        if kill is not None and step == kill:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer = Trainer(cfg, model, dist=dist, on_checkpoint=on_ckpt, **kw)
    history = trainer.train(batch_stream(mode, spec["rows"], dist.rank, dist.world, cfg.train.grad_accum,
                                         spec.get("repeat", 0)))
    if dist.rank == 0:
        out = Path(spec["out"]) / spec["name"] / "result.json"
        out.write_text(json.dumps(history))
    return history


def main(argv):
    from longreach.launch.dist import init_distributed

    torch.manual_seed(0)
    dist = init_distributed()
    spec = json.loads(Path(argv[0]).read_text())
    for run in spec["runs"]:
        run_one(run, dist)
    from longreach.launch.dist import shutdown_distributed

    shutdown_distributed()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main(sys.argv[1:])
