"""Context extension: evaluate, apply RoPE scaling, train at the new length, evaluate again, save.

Stages (each a plain function call; the recipe owns no state of its own):
  1. load the model with its original RoPE and evaluate it                     -> 'base'
  2. apply ``model.rope_scaling`` (PI / NTK / YaRN / llama3) and evaluate       -> 'scaled'   (skipped when type=none)
  3. train ``train.steps`` steps on packed ``data.seq_len`` sequences
  4. evaluate again                                                             -> 'trained'
  5. save safetensors + config.json (plain transformers loads it), tables, JSON and PNG under the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from ..launch.checks import check_lengths
from ..launch.config import RunConfig
from .evals import report
from .evals.passkey import passkey_grid
from .evals.perplexity import perplexity_by_length

log = logging.getLogger(__name__)


def _without_scaling(cfg: RunConfig) -> RunConfig:
    model = dataclasses.replace(cfg.model, rope_scaling=dataclasses.replace(cfg.model.rope_scaling, type="none"),
                                max_position_embeddings=0)
    return dataclasses.replace(cfg, model=model)


def set_rope(model, args) -> None:
    """Give ``model`` the RoPE of ``args`` (frequencies and attention scaling); weights are untouched."""
    from ..models.llama import RotaryEmbedding

    device = model.model.embed_tokens.weight.device
    model.args = args
    model.model.rotary_emb = RotaryEmbedding(args).to(device)


def evaluate(model, tokenizer, heldout: torch.Tensor, cfg: RunConfig, device, label: str) -> dict:
    """Perplexity by length and the passkey grid for one model state."""
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    e = cfg.eval
    ppl = perplexity_by_length(model, heldout, e.ppl_lengths, e.ppl_max_tokens, device=device)
    keys = passkey_grid(model, tokenizer, e.passkey_lengths, e.passkey_depths, e.passkey_trials, seed=e.seed, device=device)
    model.train(was_training)
    log.info("eval '%s' done in %.1f s", label, time.perf_counter() - t0)
    return {"perplexity": ppl, "passkey": keys}


def _setup(cfg: RunConfig):
    from ..data.packing import build_datasets
    from ..launch.dist import init_distributed
    from ..models import load_model

    dist = init_distributed()
    base_cfg = _without_scaling(cfg)
    model, tok = load_model(base_cfg.model, device=dist.device, dtype=cfg.model.dtype, max_seq_len=cfg.data.seq_len)
    if tok is None:
        raise ValueError(f"model.path={cfg.model.path!r} has no tokenizer files; add tokenizer.json to the directory")
    data = build_datasets(cfg.data, tok)
    return dist, model, tok, data


def _scaled_args(cfg: RunConfig, model):
    from ..models import apply_rope_scaling

    return apply_rope_scaling(model.args, cfg.model.rope_scaling, cfg.model.max_position_embeddings)


def evaluate_only(cfg: RunConfig) -> dict:
    """``longreach eval``: the configured model (with its configured RoPE scaling) on the held-out text."""
    dist, model, tok, data = _setup(cfg)
    if cfg.model.rope_scaling.type != "none":
        set_rope(model, _scaled_args(cfg, model))
    check_lengths(cfg, model.args.max_position_embeddings)
    res = {"model": evaluate(model, tok, data.heldout_tokens, cfg, dist.device, "model")}
    if dist.is_main:
        report.print_results(res)
        paths = report.write_report(cfg.run_dir / "eval", res)
        log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return res


def run(cfg: RunConfig, demo: bool = False) -> dict:
    from ..data.packing import batches
    from ..launch.trainer import Trainer
    from ..parallel.setup import cp_model_config, setup_parallel

    t_start = time.perf_counter()
    cfg = cp_model_config(cfg)  # before the model is built: under parallel.cp>1 its layers run the CP attention
    dist, model, tok, data = _setup(cfg)
    # parallel.* against the world and the model's heads, then the mesh: before any eval or step
    par = setup_parallel(cfg, dist, num_heads=model.args.num_attention_heads, num_kv_heads=model.args.num_key_value_heads)
    base_args = model.args
    results: dict[str, dict] = {}
    # the base model is only scored at lengths it was made for
    base_eval = dataclasses.replace(cfg, eval=dataclasses.replace(
        cfg.eval,
        ppl_lengths=[n for n in cfg.eval.ppl_lengths if n <= base_args.max_position_embeddings],
        passkey_lengths=[n for n in cfg.eval.passkey_lengths if n <= base_args.max_position_embeddings]))
    results["base"] = evaluate(model, tok, data.heldout_tokens, base_eval, dist.device, "base")
    if cfg.model.rope_scaling.type != "none":
        set_rope(model, _scaled_args(cfg, model))
        check_lengths(cfg, model.args.max_position_embeddings)
        results["scaled"] = evaluate(model, tok, data.heldout_tokens, cfg, dist.device, "scaled")
    else:
        check_lengths(cfg, model.args.max_position_embeddings)

    trainer = Trainer(cfg, model, dist=dist, **par.trainer_kwargs())
    # every CP rank of a data-parallel replica reads the same global batch; the shard_fn cuts it
    history = trainer.train(batches(data.train, cfg.data.batch_size, seed=cfg.data.seed,
                                    dp_rank=par.dp_rank, dp_world=par.dp))
    results["trained"] = evaluate(model, tok, data.heldout_tokens, cfg, dist.device, "trained")

    out_model = cfg.run_dir / "model"
    _save(trainer, model, tok, out_model, cfg, dist)
    if dist.is_main:
        report.print_results(results)
        paths = report.write_report(cfg.run_dir, results)
        summary = {
            "config": cfg.name, "model": cfg.model.path, "rope_scaling": dataclasses.asdict(cfg.model.rope_scaling),
            "seq_len": cfg.data.seq_len, "steps": cfg.train.steps,
            "train_loss_first": history[0]["loss"] if history else None,
            "train_loss_last": history[-1]["loss"] if history else None,
            "seconds": round(time.perf_counter() - t_start, 1), "saved_model": str(out_model),
            "evals": {k: str(v) for k, v in paths.items()},
        }
        (cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("run directory %s (%.0f s): model, evals.json, perplexity.png, passkey.png, metrics.jsonl",
                 cfg.run_dir, summary["seconds"])
    return results


def _save(trainer, model, tok, out_dir: Path, cfg: RunConfig, dist) -> None:
    from ..models import save_pretrained

    if cfg.train.zero_stage == 3:
        import deepspeed

        # ZeRO-3 holds a 1/N slice of each parameter per rank: gather to rank 0 for the safetensors file
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            if dist.is_main:
                save_pretrained(model, tok, out_dir)
    elif dist.is_main:
        save_pretrained(model, tok, out_dir)
