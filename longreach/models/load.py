"""``load_model``: an HF safetensors directory, a GGUF file or an embedded model -> our ``LlamaForCausalLM``
(with the configured attention plan, layer truncation and RoPE scaling) + its tokenizer.

Every check that needs no weights (path, architecture, dtype/device, attention names, layer indices, RoPE
type) runs before any tensor is read.
"""

from __future__ import annotations

from ..errors import ConfigError, ConfigPathError
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch

from ..attention import registry
from . import gguf as gguf_io
from .llama import LlamaForCausalLM, ModelArgs, RotaryEmbedding
from .rope import apply_rope_scaling, inv_freq_and_scaling
from .swap import attention_options_plan, attention_plan

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
_ACCEPTED = ("a safetensors model directory (config.json + *.safetensors), a .gguf file, or "
             f"{', '.join(repr(k) for k in gguf_io.EMBEDDED)}")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


# ----------------------------------------------------------------------------------------------- inputs
def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """torch dtype for ``dtype`` ('auto' | 'float32' | 'bfloat16' | 'float16' or a torch.dtype) on ``device``;
    raises for combinations the device cannot run."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={str(device)!r} but CUDA is not available; use device='cpu'")
    if isinstance(dtype, str):
        if dtype == "auto":
            dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
            log.info("model.dtype=auto -> %s on %s", dtype, dev)
        elif dtype in ("float32", "bfloat16", "float16"):
            dtype = getattr(torch, dtype)
        else:
            raise ConfigError(f"model.dtype={dtype!r} is not one of auto, float32, bfloat16")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(f"model.dtype={dtype} is not supported; use float32 or bfloat16")
    if dev.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"model.dtype=bfloat16 is not supported by {torch.cuda.get_device_name(dev)}; use float32")
    if dev.type == "cpu" and dtype == torch.float16:
        raise ConfigError("model.dtype=float16 is not supported on CPU (and DeepSpeed refuses fp16 there); use float32")
    if dev.type == "cpu" and dtype == torch.bfloat16:
        log.warning("model.dtype=bfloat16 on CPU works but is 5-10x slower than float32 on most CPUs")
    return dtype


def resolve_path(path: str) -> tuple[str, Path]:
    """('gguf' | 'hf', path) for ``model.path``; raises naming the field and what it accepts."""
    if path in gguf_io.EMBEDDED:
        return "gguf", gguf_io.embedded_path(path)
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigPathError(f"model.path={path!r} does not exist; model.path accepts {_ACCEPTED}")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ConfigError(f"model.path={path!r} is a file but not a .gguf; model.path accepts {_ACCEPTED}")
        return "gguf", p
    if not (p / "config.json").is_file():
        raise ConfigPathError(f"model.path={path!r} is a directory without config.json; model.path accepts {_ACCEPTED}")
    if not _weight_files(p):
        raise ConfigPathError(f"model.path={path!r} has config.json but no *.safetensors weights "
                                "(.bin checkpoints are not read; re-save them with safetensors)")
    return "hf", p


def _weight_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [d / n for n in names]
    return sorted(d.glob("*.safetensors"))


def args_from_hf_config(cfg: dict, where: str = "config.json") -> ModelArgs:
    """``ModelArgs`` from an HF config.json dict (transformers 4 or 5 RoPE format)."""
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{where}: model_type={mt!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act={cfg['hidden_act']!r} is not supported (only silu)")
    if mt == "llama" and cfg.get("attention_bias"):
        raise ConfigError(f"{where}: llama attention_bias=true (biases on q/k/v/o) is not supported")
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    rp = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(rp.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0)
    if rp.pop("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{where}: partial_rotary_factor != 1 is not supported")
    kind = rp.pop("rope_type", None) or rp.pop("type", None) or "default"
    rp.pop("type", None)
    max_pos = int(cfg.get("max_position_embeddings", 2048))
    if kind in ("yarn", "llama3", "longrope"):
        rp.setdefault("original_max_position_embeddings", max_pos)  # what transformers 5 fills in
    window = cfg.get("sliding_window")
    if mt == "qwen2" and not cfg.get("use_sliding_window", False):
        window = None
    return ModelArgs(
        vocab_size=cfg["vocab_size"], hidden_size=hidden, intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads, rope_theta=theta,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), max_position_embeddings=max_pos,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=mt == "qwen2", mlp_bias=bool(cfg.get("mlp_bias", False)), model_type=mt,
        rope_scaling=None if kind == "default" else {"rope_type": kind, **rp},
        sliding_window=window, bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        torch_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
    )


def _check_args(args: ModelArgs, model_cfg, max_seq_len: Optional[int]) -> tuple[ModelArgs, list[str], list[dict]]:
    """Truncation, attention plan, RoPE scaling and sliding-window checks on the config alone."""
    n = args.num_hidden_layers
    if model_cfg.num_layers:
        if model_cfg.num_layers > n:
            raise ConfigError(f"model.num_layers={model_cfg.num_layers} exceeds the model's {n} layers; use 0 (all) or <= {n}")
        if model_cfg.num_layers < n:
            log.info("model.num_layers=%d: keeping the first %d of %d decoder layers", model_cfg.num_layers,
                     model_cfg.num_layers, n)
        args = dataclasses.replace(args, num_hidden_layers=model_cfg.num_layers)
    plan = attention_plan(model_cfg, args.num_hidden_layers)
    options = attention_options_plan(model_cfg, plan)
    try:
        inv_freq_and_scaling(args)  # the checkpoint's own RoPE (e.g. refuses 'dynamic' with the reason)
    except ValueError as e:
        raise ConfigError(f"model.path={model_cfg.path!r}: {e}") from None
    args = apply_rope_scaling(args, model_cfg.rope_scaling, model_cfg.max_position_embeddings)
    if args.sliding_window is not None:
        w = args.sliding_window
        if max_seq_len is not None and max_seq_len > w:
            raise ConfigError(f"model.path={model_cfg.path!r} uses sliding_window={w} but sequences are {max_seq_len} "
                             f"tokens; longreach attention is full causal, so use data.seq_len <= {w}")
        log.warning("model.path=%r has sliding_window=%d; longreach attention ignores it (full causal), which is "
                    "identical only for sequences <= %d tokens", model_cfg.path, w, w)
    return args, plan, options


# ----------------------------------------------------------------------------------------------- weights
def read_state_dict(d: Path, keep_layers: int) -> dict[str, torch.Tensor]:
    """Tensors of an HF safetensors directory (sharded or not), skipping layers >= keep_layers."""
    from safetensors import safe_open

    sd = {}
    for f in _weight_files(d):
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for k in fh.keys():
                if k.startswith("model.layers.") and int(k.split(".")[2]) >= keep_layers:
                    continue
                if k.endswith("rotary_emb.inv_freq"):  # old checkpoints store this buffer; we recompute it
                    continue
                sd[k] = fh.get_tensor(k)
    return sd


def build_model(args: ModelArgs, plan: list[str], options: list[dict], state_dict: dict[str, torch.Tensor], *,
                device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """Our model holding ``state_dict``'s tensors (cast to ``dtype`` on ``device``), built on the meta device
    so no random init is spent on weights that get overwritten. Attention modules with their own parameters
    keep their fresh init unless the state dict has them."""
    with torch.device("meta"):
        model = LlamaForCausalLM(args, attention=plan, attention_options=options)
    with torch.device(device):
        for i, layer in enumerate(model.model.layers):
            spec = registry.AttnSpec(plan[i], i, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
                                     dict(options[i]))
            layer.self_attn.impl = registry.build(spec).to(dtype)
        model.model.rotary_emb = RotaryEmbedding(args)  # fp32 inv_freq, computed on the real device
    expected = {k for k in model.state_dict() if ".impl." not in k}
    if args.tie_word_embeddings:
        expected.discard("lm_head.weight")
        state_dict.pop("lm_head.weight", None)  # some tied checkpoints store it anyway; the tie wins like in HF
    missing = sorted(expected - set(state_dict))
    own = set(model.state_dict())
    unexpected = sorted(set(state_dict) - own)
    if missing or [k for k in unexpected if ".impl." not in k]:
        raise ValueError(f"checkpoint does not match the {args.model_type} architecture: missing {missing[:6]}"
                         f"{'...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}")
    if unexpected:
        log.warning("checkpoint has attention-module parameters the current attention plan does not use: %s",
                    unexpected[:6])
    sd = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items() if k in own}
    model.load_state_dict(sd, strict=False, assign=True)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not meta, f"tensors left on the meta device: {meta[:5]}"
    return model


def _tokenizer(d: Path):
    if not any((d / f).is_file() for f in _TOKENIZER_FILES):
        log.warning("%s has no tokenizer files; returning tokenizer=None", d)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d))


# ----------------------------------------------------------------------------------------------- entry point
def load_model(model_cfg, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = torch.float32,
               max_seq_len: Optional[int] = None, cache_dir: Optional[Path] = None):
    """Load ``model_cfg.path`` as our ``LlamaForCausalLM`` + tokenizer (a transformers fast tokenizer, or None
    when an HF directory has no tokenizer files).

    model_cfg: ``launch.config.ModelConfig``. dtype: torch dtype or 'auto'/'float32'/'bfloat16'.
    max_seq_len: the training/eval sequence length, if known: checked against a sliding window.
    cache_dir: where GGUF conversions are cached (default $LONGREACH_CACHE or ~/.cache/longreach).
    """
    t0 = time.perf_counter()
    dev = torch.device(device)
    dtype = resolve_dtype(dtype, dev)
    kind, path = resolve_path(model_cfg.path)
    registry.names()  # import the built-in implementations before names are checked
    if kind == "gguf":
        path = gguf_io.convert_cached(path, cache_dir, check=lambda a: _check_args(a, model_cfg, max_seq_len))
    args = args_from_hf_config(json.loads((path / "config.json").read_text()), where=f"model.path={model_cfg.path!r}")
    args, plan, options = _check_args(args, model_cfg, max_seq_len)
    sd = read_state_dict(path, args.num_hidden_layers)
    model = build_model(args, plan, options, sd, device=dev, dtype=dtype)
    tok = _tokenizer(path)
    log.info("loaded %s (%s, %d layers, %s on %s) in %.1f s", model_cfg.path, args.model_type,
             args.num_hidden_layers, dtype, dev, time.perf_counter() - t0)
    return model, tok
