"""Runs tiny hybrid (softmax + 'linear') Trainer jobs under context parallelism (torchrun; one process for CP=1).

Usage: python linear_cp_trainer_runner.py SPEC.json   where SPEC is {"runs": [run, ...]} and each run is
{"out": dir, "name": str, "overrides": ["parallel.cp=2", ...], "model": {"attention_layers": {...}, ...}}
("model" holds ``ModelConfig`` fields set on the loaded config: dicts do not travel well through a dotlist).
The path is the recipe's: ``cp_model_config`` -> the per-layer attention plan of ``models/swap.py`` -> model ->
``setup_parallel`` -> ``Trainer(**trainer_kwargs())``. Data, steps and the result file are those of
``cp_trainer_runner.py`` (packed documents of odd and even lengths, SEQ=37 so every CP run pads).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("cp_trainer_runner", HERE / "cp_trainer_runner.py")
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)


def hybrid_model(model_cfg):
    """The tiny 2-layer model of ``cp_trainer_runner`` with the per-layer plan and options of ``model_cfg``."""
    from longreach.models.llama import LlamaForCausalLM, ModelArgs
    from longreach.models.swap import attention_options_plan, attention_plan

    args = ModelArgs(vocab_size=base.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    plan = attention_plan(model_cfg, args.num_hidden_layers)
    options = attention_options_plan(model_cfg, plan)
    # feature maps start from their own deterministic (identity) init; init_weights leaves them alone
    return LlamaForCausalLM(args, attention=plan, attention_options=options).init_weights(
        generator=torch.Generator().manual_seed(0))


def run_one(spec: dict, dist) -> list[dict]:
    from longreach.launch.config import load_config
    from longreach.launch.trainer import Trainer
    from longreach.parallel.setup import cp_model_config, setup_parallel

    cfg = load_config(overrides=[f"out_dir={spec['out']}", f"name={spec['name']}", *base.COMMON, *spec["overrides"]])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **spec.get("model", {})))
    cfg = cp_model_config(cfg)
    model = hybrid_model(cfg.model)
    par = setup_parallel(cfg, dist, num_heads=model.args.num_attention_heads,
                         num_kv_heads=model.args.num_key_value_heads)
    trainer = Trainer(cfg, model, dist=dist, save_checkpoints=False, **par.trainer_kwargs())
    history = trainer.train(base.stream(dp_rank=par.dp_rank, dp=par.dp, batch_size=cfg.data.batch_size,
                                        grad_accum=cfg.train.grad_accum))
    if dist.rank == 0:
        out = Path(spec["out"]) / spec["name"]
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps({"history": history, "attention": model.attention_names,
                                                     "options": dict(cfg.model.attention_options),
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
