"""Write our model as a Hugging Face directory (config.json + model.safetensors + tokenizer files) that
``transformers.AutoModelForCausalLM.from_pretrained`` loads with the same logits. Writes are atomic:
everything goes to a temporary sibling directory that is renamed into place."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .llama import LlamaForCausalLM, ModelArgs

log = logging.getLogger(__name__)

_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def hf_config_dict(args: ModelArgs) -> dict:
    """config.json contents in transformers 5's format (RoPE settings under ``rope_parameters``)."""
    if args.model_type not in _ARCH:
        raise ValueError(f"model_type={args.model_type!r} cannot be saved; supported: {', '.join(_ARCH)}")
    rope = {"rope_type": "default", **(args.rope_scaling or {}), "rope_theta": float(args.rope_theta)}
    cfg = dict(
        architectures=[_ARCH[args.model_type]], model_type=args.model_type, vocab_size=args.vocab_size,
        hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads, head_dim=args.head_dim, hidden_act="silu",
        max_position_embeddings=args.max_position_embeddings, rms_norm_eps=args.rms_norm_eps,
        tie_word_embeddings=args.tie_word_embeddings, rope_parameters=rope,
        bos_token_id=args.bos_token_id, eos_token_id=args.eos_token_id, dtype=args.torch_dtype, use_cache=True,
    )
    if args.model_type == "llama":
        # HF Llama puts attention_bias on o_proj too; our loader refuses that case, so False here is exact
        cfg.update(attention_bias=False, mlp_bias=args.mlp_bias)
        if args.attention_bias:
            raise ValueError("a llama-type model with q/k/v bias cannot be written as LlamaConfig "
                             "(HF's attention_bias also adds an o_proj bias); use model_type qwen2")
    elif args.model_type == "qwen2":
        if not args.attention_bias or args.mlp_bias:
            raise ValueError("qwen2 models have q/k/v biases and no MLP bias; these args do not match")
        cfg.pop("head_dim")  # Qwen2 derives head_dim = hidden_size / num_attention_heads
        if args.head_dim * args.num_attention_heads != args.hidden_size:
            raise ValueError(f"qwen2 needs head_dim*num_attention_heads == hidden_size, got {args.head_dim}*"
                             f"{args.num_attention_heads} != {args.hidden_size}")
        cfg.update(use_sliding_window=args.sliding_window is not None, sliding_window=args.sliding_window,
                   max_window_layers=args.num_hidden_layers)
    else:
        if args.attention_bias or args.mlp_bias:
            raise ValueError("mistral models have no biases; these args have attention_bias or mlp_bias")
        cfg.update(sliding_window=args.sliding_window)
    return cfg


def _atomic_dir(out_dir: Path, write, exist_ok: bool = False) -> Path:
    """Run ``write(tmp_dir)`` then rename tmp_dir to ``out_dir``. An existing ``out_dir`` is replaced
    (``exist_ok=False``) or kept, discarding ours (``exist_ok=True``: a concurrent cache writer won)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; a shared cache / run dir wants the usual mode
    try:
        write(tmp)
        if out_dir.exists():
            if exist_ok:
                shutil.rmtree(tmp)
                return out_dir
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.rename(out_dir, old)  # two renames: the window without out_dir is tiny, never a half-written dir
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
        else:
            try:
                os.rename(tmp, out_dir)
            except OSError:
                if not (exist_ok and out_dir.exists()):  # lost a race to a concurrent writer: keep theirs
                    raise
                shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def save_state_dict_dir(state_dict: dict[str, torch.Tensor], args: ModelArgs, tokenizer, out_dir: str | Path,
                        *, exist_ok: bool = False) -> Path:
    """Write an HF-named state dict + ``args`` (+ tokenizer) as an HF directory, atomically."""
    sd = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    if args.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # HF ties it back to embed_tokens on load; writing it twice is refused
    dtypes = {str(v.dtype).replace("torch.", "") for k, v in sd.items() if v.is_floating_point() and ".impl." not in k}
    if len(dtypes) == 1:
        args = dataclasses.replace(args, torch_dtype=dtypes.pop())
    cfg = hf_config_dict(args)

    def write(tmp: Path):
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    return _atomic_dir(Path(out_dir), write, exist_ok=exist_ok)


def save_pretrained(model: LlamaForCausalLM, tokenizer, out_dir: str | Path) -> Path:
    """Write ``model`` (our ``LlamaForCausalLM``) and ``tokenizer`` (or None) as an HF directory at ``out_dir``.

    Parameters of non-dense attention modules (``*.impl.*``) are saved too; transformers ignores them
    (with a warning) and ``load_model`` reads them back when the same attention plan is used.
    """
    log.info("saving model to %s", out_dir)
    return save_state_dict_dir(model.state_dict(), model.args, tokenizer, out_dir)
