"""Runs tiny context-parallel Trainer jobs (launched by torchrun; one process for the CP=1 reference).

Usage: python cp_trainer_runner.py SPEC.json   where SPEC is {"runs": [run, ...]} and each run is
{"out": dir, "name": str, "overrides": ["parallel.cp=2", "train.zero_stage=3", ...]}.
The path is the recipe's: ``cp_model_config`` -> model -> ``setup_parallel`` -> ``Trainer(**trainer_kwargs())``,
batches by data-parallel rank. Rank 0 writes <out>/<name>/result.json with the per-step metrics.

Data: step ``s`` has one global batch of ``GLOBAL_ROWS`` rows of ``SEQ`` (odd: padded under CP) tokens holding
packed documents of odd and even lengths, with a random tail of each row out of the loss, so CP shards, ranks
and micro-batches all hold different real-token counts. A run with dp replicas, ``data.batch_size`` b and
``train.grad_accum`` a must have ``dp * b * a == GLOBAL_ROWS``; it then sees exactly the global batch of the
one-process reference, cut differently.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

SEQ = 37
GLOBAL_ROWS = 4
VOCAB = 128
COMMON = ["train.steps=3", "train.lr=1e-2", "train.warmup_steps=1", "tracking.wandb=false", "tracking.progress=false",
          f"data.seq_len={SEQ}"]


def tiny_model(attention: str, heads: int = 4, kv_heads: int = 2):
    from longreach.models.llama import LlamaForCausalLM, ModelArgs

    args = ModelArgs(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=64)
    return LlamaForCausalLM(args, attention=attention).init_weights(generator=torch.Generator().manual_seed(0))


def global_batch(step: int):
    """The global batch of ``step``: ids/labels/positions [GLOBAL_ROWS, SEQ] with packed documents."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (GLOBAL_ROWS, SEQ), generator=g)
    pos = torch.zeros(GLOBAL_ROWS, SEQ, dtype=torch.long)
    labels = torch.full((GLOBAL_ROWS, SEQ), -100)
    for r in range(GLOBAL_ROWS):
        n_cuts = r % 3  # 0, 1 or 2 inner boundaries: one to three documents per row
        inner = sorted(set(torch.randint(1, SEQ, (n_cuts,), generator=g).tolist()))
        bounds = [0, *inner, SEQ]
        for a, e in zip(bounds[:-1], bounds[1:]):
            pos[r, a:e] = torch.arange(e - a)
            labels[r, a:e - 1] = ids[r, a + 1:e]  # shifted within the document; its last token has no label
        tail = int(torch.randint(SEQ // 2, SEQ + 1, (1,), generator=g))
        labels[r, tail:] = -100  # uneven real-token counts across the zigzag shards
    return ids, labels, pos


def stream(*, dp_rank: int, dp: int, batch_size: int, grad_accum: int):
    """Micro-batches of one data-parallel replica (every CP rank of it reads the same ones)."""
    from longreach.attention.context import cu_seqlens_from_position_ids
    from longreach.data.batch import Batch

    if dp * batch_size * grad_accum != GLOBAL_ROWS:
        raise ValueError(f"dp={dp} x data.batch_size={batch_size} x train.grad_accum={grad_accum} != {GLOBAL_ROWS}")
    step = 0
    while True:
        ids, labels, pos = global_batch(step)
        for j in range(grad_accum):
            k = j * dp + dp_rank
            rows = slice(k * batch_size, (k + 1) * batch_size)
            p = pos[rows].clone()
            yield Batch(ids[rows].clone(), labels[rows].clone(), p, cu_seqlens_from_position_ids(p))
        step += 1


def run_one(spec: dict, dist) -> list[dict]:
    from longreach.launch.config import load_config
    from longreach.launch.trainer import Trainer
    from longreach.parallel.setup import cp_model_config, setup_parallel

    cfg = load_config(overrides=[f"out_dir={spec['out']}", f"name={spec['name']}", *COMMON, *spec["overrides"]])
    cfg = cp_model_config(cfg)
    model = tiny_model(cfg.model.attention)
    par = setup_parallel(cfg, dist, num_heads=model.args.num_attention_heads,
                         num_kv_heads=model.args.num_key_value_heads)
    trainer = Trainer(cfg, model, dist=dist, save_checkpoints=False, **par.trainer_kwargs())
    history = trainer.train(stream(dp_rank=par.dp_rank, dp=par.dp, batch_size=cfg.data.batch_size,
                                   grad_accum=cfg.train.grad_accum))
    if dist.rank == 0:
        out = Path(spec["out"]) / spec["name"]
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps({"history": history, "attention": model.attention_names,
                                                     "dp": par.dp, "cp": cfg.parallel.cp}))
    return history


def main(argv):
    from longreach.launch.dist import init_distributed

    torch.manual_seed(0)
    dist = init_distributed()
    for run in json.loads(Path(argv[0]).read_text())["runs"]:
        run_one(run, dist)
    from longreach.launch.dist import shutdown_distributed

    shutdown_distributed()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main(sys.argv[1:])
