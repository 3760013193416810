"""Training throughput: our model + Trainer vs plain ``transformers.LlamaForCausalLM`` (attn 'sdpa') + DeepSpeed.

Same weights, sequence length, ZeRO stage, precision and optimizer; a few warmup steps, then timed steps.
Tokens/s counts the tokens of the timed steps; peak memory is CUDA max-allocated per phase (on CPU: the
process's lifetime peak RSS, so the second phase's figure includes the first).

CLI: ``python -m longreach.launch.bench.train --seq-len 512 --layers 2`` (``main(argv)``).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..config import RunConfig, load_config
from ..dist import DistInfo, init_distributed
from ..metrics import peak_memory_bytes, reset_peak_memory
from ..trainer import Trainer, build_ds_config, resolve_bf16

log = logging.getLogger(__name__)


def hf_llama_from(model: nn.Module) -> nn.Module:
    """A ``transformers.LlamaForCausalLM`` with ``model``'s weights (HF parameter names match ours)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    a = model.args
    cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
                      num_hidden_layers=a.num_hidden_layers, num_attention_heads=a.num_attention_heads,
                      num_key_value_heads=a.num_key_value_heads, head_dim=a.head_dim, rope_theta=a.rope_theta,
                      rms_norm_eps=a.rms_norm_eps, max_position_embeddings=a.max_position_embeddings,
                      tie_word_embeddings=a.tie_word_embeddings, attention_bias=a.attention_bias, mlp_bias=a.mlp_bias,
                      attn_implementation="sdpa")
    hf = LlamaForCausalLM(cfg)
    missing, unexpected = hf.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()},
                                             strict=False)
    missing = [k for k in missing if not (a.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"HF copy: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return hf


def _random_batches(vocab: int, seq_len: int, batch_size: int, n: int, seed: int = 0):
    from ...data.batch import Batch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=g)
        pos = torch.arange(seq_len).expand(batch_size, seq_len).clone()
        out.append(Batch(ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), pos))
    return out


# Llama-3.2-1B's shape (random init): 16 layers, hidden 2048, 32 q / 8 kv heads of 64, MLP 8192, vocab 128256
PRESETS = {
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                     max_position_embeddings=131072, tie_word_embeddings=True),
}
# bf16 dense tensor-core peak per GPU, for MFU (NVIDIA datasheet, SXM)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def train_flops_per_token(args, seq_len: int) -> float:
    """Model FLOPs per trained token (PaLM appendix B, causal attention): 6 N (N = parameters without the
    embedding) + 6 L d S (attention scores and values, causal half of 12 L d S); recompute is not counted (MFU)."""
    h, L = args.hidden_size, args.num_hidden_layers
    hq, hkv, d = args.num_attention_heads, args.num_key_value_heads, args.head_dim
    per_layer = h * hq * d * 2 + h * hkv * d * 2 + 3 * h * args.intermediate_size
    n = L * per_layer + h * args.vocab_size  # the LM head's matmul counts; the embedding lookup does not
    return 6.0 * n + 6.0 * L * hq * d * seq_len


def _peak_tflops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def _summary(step_times: list[float], tokens_per_step: int, peak: int) -> dict:
    total = sum(step_times)
    return {"tokens_per_s": tokens_per_step * len(step_times) / total, "step_time_s": total / len(step_times),
            "peak_mem_bytes": peak, "step_times_s": step_times}


def _bench_ours(cfg: RunConfig, model: nn.Module, batches, warmup: int, dist: DistInfo, par=None) -> dict:
    trainer = Trainer(cfg, model, dist=dist, save_checkpoints=False, **(par.trainer_kwargs() if par else {}))
    reset_peak_memory(dist.device)
    hist = trainer.train(iter(batches), start_step=1)
    peak = peak_memory_bytes(dist.device)
    del trainer
    out = _summary([m["step_time_s"] for m in hist[warmup:]], hist[0]["tokens"], peak)
    out["losses"] = [m["loss"] for m in hist]  # every step's, warmup included (CP vs no-CP runs compare these)
    return out


def _bench_hf(cfg: RunConfig, hf: nn.Module, batches, warmup: int, dist: DistInfo) -> dict:
    import deepspeed

    t = cfg.train
    bf16 = resolve_bf16(cfg, dist.device)
    hf = hf.to(dist.device)
    if t.activation_checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(hf.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, eps=1e-8)
    engine, _, _, _ = deepspeed.initialize(model=hf, optimizer=opt, config=build_ds_config(cfg, bf16=bf16),
                                           dist_init_required=False)
    engine.train()
    reset_peak_memory(dist.device)
    times = []
    for b in batches:
        b = b.to(dist.device)
        t0 = time.perf_counter()
        # HF's own path: labels = the unshifted ids (it shifts internally), full-vocab logits, mean loss
        out = engine(input_ids=b.input_ids, position_ids=b.position_ids, labels=b.input_ids)
        engine.backward(out.loss)
        engine.step()
        if dist.device.type == "cuda":
            torch.cuda.synchronize(dist.device)
        times.append(time.perf_counter() - t0)
    peak = peak_memory_bytes(dist.device)
    del engine, opt
    return _summary(times[warmup:], batches[0].input_ids.numel(), peak)


def bench_train(model: nn.Module, *, hf_builder: Callable[[nn.Module], nn.Module] = hf_llama_from, seq_len: int,
                steps: int = 5, warmup: int = 2, zero_stage: int = 0, precision: str = "auto", batch_size: int = 1,
                activation_checkpointing: bool = False, dist: Optional[DistInfo] = None,
                out_json: Optional[str | Path] = None, out_dir: str = "runs/bench", attention: str = "dense",
                with_hf: bool = True, cp: int = 1, strategy: str = "ring", ulysses: int = 1) -> dict:
    """Time ``warmup + steps`` training steps of ``model`` (our LlamaForCausalLM) with the Trainer, then of
    ``hf_builder(model)`` with plain DeepSpeed; returns {"config", "ours", "hf", "speedup"} and writes JSON.

    ``cp > 1``: context parallel over ``cp`` ranks (``strategy``/``ulysses`` as ``parallel.*``; data parallel over
    the rest of the world), every layer on the strategy's attention; no HF peer then (it has no CP). Tokens/s are
    global (every rank's real tokens per step); MFU is per GPU."""
    dist = dist or init_distributed()
    if cp > 1 and with_hf:
        raise ValueError("bench train: the transformers peer has no context parallelism; pass with_hf=False (--no-hf)")
    cfg = load_config(overrides=[
        f"out_dir={out_dir}", "name=bench_train", f"train.steps={warmup + steps}", f"train.zero_stage={zero_stage}",
        f"train.precision={precision}", f"data.seq_len={seq_len}", f"data.batch_size={batch_size}",
        f"train.activation_checkpointing={str(activation_checkpointing).lower()}", "train.warmup_steps=1",
        "train.lr=1e-5", "tracking.wandb=false", "tracking.progress=false", "train.resume=false",
        f"model.attention={attention}", f"parallel.cp={cp}", f"parallel.strategy={strategy}",
        f"parallel.ulysses={ulysses}"])
    par = None
    if cp > 1:
        from ...parallel.setup import cp_model_config, setup_parallel

        cfg = cp_model_config(cfg)
        attention = cfg.model.attention  # the strategy's attention on every softmax layer
        par = setup_parallel(cfg, dist, num_heads=model.args.num_attention_heads,
                             num_kv_heads=model.args.num_key_value_heads)
    if attention != "dense":  # every layer on this attention implementation (the registry's name)
        from ...attention import registry

        for i, layer in enumerate(model.model.layers):
            att = layer.self_attn
            att.impl = registry.build(registry.AttnSpec(attention, i, att.num_heads, att.num_kv_heads, att.head_dim, {}))
            att.attn_name = attention
    n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    hf = hf_builder(model) if with_hf else None  # copy the weights before our run updates them
    batches = _random_batches(model.args.vocab_size, seq_len, batch_size, warmup + steps)
    ours = _bench_ours(cfg, model, batches, warmup, dist, par)
    if dist.world > 1:  # peak memory per GPU: the largest over the ranks
        import torch.distributed as tdist

        peak = torch.tensor([float(ours["peak_mem_bytes"])],
                            device=dist.device if dist.device.type == "cuda" else "cpu")
        tdist.all_reduce(peak, op=tdist.ReduceOp.MAX)
        ours["peak_mem_bytes"] = int(peak.item())
    gc.collect()
    if dist.device.type == "cuda":
        model.to("cpu")
        torch.cuda.empty_cache()
    theirs = _bench_hf(cfg, hf, batches, warmup, dist) if with_hf else None
    fpt = train_flops_per_token(model.args, seq_len)
    peak_tf = _peak_tflops(dist.device)
    for m in (ours, theirs):
        if m is not None:
            m["model_tflops_per_gpu"] = m["tokens_per_s"] * fpt / dist.world / 1e12
            m["mfu"] = m["model_tflops_per_gpu"] / peak_tf if peak_tf else None
    result = {
        "config": {"seq_len": seq_len, "batch_size": batch_size, "steps": steps, "warmup": warmup,
                   "zero_stage": zero_stage, "precision": "bf16" if resolve_bf16(cfg, dist.device) else "fp32",
                   "activation_checkpointing": activation_checkpointing, "world": dist.world,
                   "device": torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else "cpu",
                   "layers": model.args.num_hidden_layers, "torch": torch.__version__, "attention": attention,
                   "params": n_params, "flops_per_token": fpt, "peak_tflops_per_gpu": peak_tf,
                   "cp": cp, "strategy": strategy if cp > 1 else None, "ulysses": ulysses if cp > 1 else None},
        "ours": ours, "hf": theirs,
        "speedup": ours["tokens_per_s"] / theirs["tokens_per_s"] if theirs else None,
    }
    if dist.is_main:
        _print_table(result)
        if out_json:
            Path(out_json).parent.mkdir(parents=True, exist_ok=True)
            Path(out_json).write_text(json.dumps(result, indent=2))
    return result


def _print_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    c = r["config"]
    table = Table(title=f"train step: seq {c['seq_len']} x {c['batch_size']}, ZeRO-{c['zero_stage']}, {c['precision']}, "
                        f"{c['layers']} layers, {c['device']}")
    for col in ("impl", "tokens/s", "step (s)", "peak mem (GiB)", "MFU"):
        table.add_column(col, justify="right")
    for name, key in (("longreach", "ours"), ("HF sdpa + DeepSpeed", "hf")):
        m = r[key]
        if m is None:
            continue
        mfu = f"{m['mfu']:.1%}" if m.get("mfu") is not None else "-"
        table.add_row(name, f"{m['tokens_per_s']:.0f}", f"{m['step_time_s']:.3f}", f"{m['peak_mem_bytes'] / 2**30:.2f}",
                      mfu)
    Console().print(table)
    if r["speedup"] is not None:
        Console().print(f"speedup (tokens/s): {r['speedup']:.2f}x")


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="longreach bench train", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded:smollm2-135m",
                   help="model.path for load_model; 'random' = random SmolLM2-shaped; 'random:llama-1b' = random "
                        "Llama-3.2-1B-shaped")
    p.add_argument("--attention", default="dense", help="model.attention (dense = torch SDPA, flash = our kernel)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers + DeepSpeed comparison")
    p.add_argument("--cp", type=int, default=1, help="context-parallel degree (launch under torchrun; implies --no-hf)")
    p.add_argument("--strategy", default="ring", choices=["ring", "ulysses", "hybrid"], help="parallel.strategy")
    p.add_argument("--ulysses", type=int, default=1, help="parallel.ulysses (ulysses: = cp; hybrid: divides cp)")
    p.add_argument("--layers", type=int, default=0, help="keep only the first N layers (0 = all)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--out", default="bench/results/train.json")
    a = p.parse_args(argv)
    dist = init_distributed()
    if a.model == "random" or a.model.startswith("random:"):
        from ...models.llama import LlamaForCausalLM, ModelArgs

        preset = a.model.partition(":")[2]
        if preset and preset not in PRESETS:
            raise SystemExit(f"--model random:{preset}: unknown preset; choose one of {sorted(PRESETS)}")
        args = ModelArgs(**PRESETS.get(preset, {}))
        if a.layers:
            args.num_hidden_layers = a.layers
        model = LlamaForCausalLM(args).init_weights(generator=torch.Generator().manual_seed(0))
    else:
        from ...models.load import load_model

        mcfg = load_config(overrides=[f"model.path={a.model}", f"model.num_layers={a.layers}"]).model
        model, _ = load_model(mcfg, device="cpu", dtype=torch.float32, max_seq_len=a.seq_len)
    return bench_train(model, seq_len=a.seq_len, steps=a.steps, warmup=a.warmup, zero_stage=a.zero,
                       precision=a.precision, batch_size=a.batch_size, activation_checkpointing=a.activation_checkpointing,
                       dist=dist, out_json=a.out, attention=a.attention, with_hf=not (a.no_hf or a.cp > 1),
                       cp=a.cp, strategy=a.strategy, ulysses=a.ulysses)


if __name__ == "__main__":
    main()
