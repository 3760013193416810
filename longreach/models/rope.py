"""RoPE inverse frequencies and context-extension scaling, matching transformers' ``ROPE_INIT_FUNCTIONS``.

``args.rope_scaling`` is the HF-style dict (``{'rope_type': 'yarn', 'factor': 4.0, ...}``) that
``models/save.py`` writes as ``rope_parameters`` in config.json, so plain transformers rebuilds the same
frequencies. The static NTK-aware recipe ('ntk') has no HF rope type: it is folded into ``rope_theta``.

'dynamic' (HF's dynamic NTK) recomputes the frequencies from ``max(position_ids) + 1`` at every forward.
That value differs between packed documents, context-parallel shards and generation steps, so a model
trained with it would see frequencies that depend on batch layout: ``inv_freq_and_scaling`` computes it for
an explicit ``seq_len`` (for evaluation code and tests) but refuses to build a model with it.
"""

from __future__ import annotations

from ..errors import ConfigError
import dataclasses
import logging
import math
from typing import Optional

import torch

log = logging.getLogger(__name__)

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
"""HF rope types this module computes (longrope and others are refused)."""


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    # fp32 exactly like transformers: arange(int64) -> float32, then pow in fp32
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def rope_type(args) -> str:
    """The HF rope type of ``args`` ('default' when there is no scaling)."""
    rs = args.rope_scaling or {}
    return rs.get("rope_type", rs.get("type", "default"))


def inv_freq_and_scaling(args, seq_len: Optional[int] = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies fp32 [head_dim/2] and the cos/sin (attention) scaling factor for ``args``.

    ``args`` needs head_dim, rope_theta, max_position_embeddings and rope_scaling (HF dict or None).
    ``seq_len`` is only used by 'dynamic', which needs it (see the module docstring).
    """
    rs = dict(args.rope_scaling or {})
    kind = rope_type(args)
    base, dim = float(args.rope_theta), int(args.head_dim)
    if kind == "default":
        return _base_inv_freq(base, dim), 1.0
    if kind not in ROPE_TYPES:
        raise ConfigError(f"rope_scaling rope_type={kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    factor = float(rs["factor"])
    if kind == "linear":
        return _base_inv_freq(base, dim) / factor, 1.0
    if kind == "dynamic":
        if seq_len is None:
            raise ConfigError(
                "rope_scaling rope_type='dynamic' recomputes RoPE from the run-time sequence length "
                "(max(position_ids)+1), which differs across packed documents and context-parallel shards; "
                "longreach does not build models with it. Use model.rope_scaling.type=ntk (static NTK, folded "
                "into rope_theta) or yarn instead."
            )
        orig = args.max_position_embeddings  # HF's dynamic NTK uses max_position_embeddings as the trained length
        seq_len = max(int(seq_len), orig)
        base = base * ((factor * seq_len / orig) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if kind == "yarn":
        return _yarn(rs, base, dim, factor)
    return _llama3(rs, base, dim, factor)


def _yarn(rs: dict, base: float, dim: int, factor: float) -> tuple[torch.Tensor, float]:
    # YaRN, https://arxiv.org/abs/2309.00071, transcribed from transformers' _compute_yarn_parameters
    orig = rs["original_max_position_embeddings"]
    attention_factor = rs.get("attention_factor")
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(rotations):  # the dimension whose wavelength makes `rotations` turns over `orig` tokens
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extra_factor = 1 - ramp
    inv_freq = interpolation * (1 - extra_factor) + extrapolation * extra_factor
    return inv_freq, float(attention_factor)


def _llama3(rs: dict, base: float, dim: int, factor: float) -> tuple[torch.Tensor, float]:
    # Llama 3.1 frequency-dependent interpolation, transcribed from transformers' _compute_llama3_parameters
    inv_freq = _base_inv_freq(base, dim)
    low_ff, high_ff = rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low_ff, old_len / high_ff
    wavelen = 2 * math.pi / inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, out), 1.0


def apply_rope_scaling(args, cfg, max_position_embeddings: int = 0):
    """New ``ModelArgs`` with RoPE scaling ``cfg`` (a ``RopeScalingConfig``) applied.

    The result carries the HF-style ``rope_scaling`` dict and the new ``max_position_embeddings``
    (``max_position_embeddings`` when > 0, else original * factor). 'ntk' changes ``rope_theta`` to
    theta * factor^(d/(d-2)) and leaves ``rope_scaling`` empty. A model that already has scaling gets it
    replaced, measured from that scaling's original length (``factor`` is always new length / original).
    """
    kind = cfg.type
    if kind == "none":
        if max_position_embeddings:
            log.info("max_position_embeddings %d -> %d (no RoPE scaling)", args.max_position_embeddings,
                     max_position_embeddings)
            return dataclasses.replace(args, max_position_embeddings=int(max_position_embeddings))
        return args
    if kind == "dynamic":
        inv_freq_and_scaling(dataclasses.replace(args, rope_scaling={"rope_type": "dynamic", "factor": cfg.factor}))
    if kind not in ("linear", "ntk", "yarn", "llama3"):
        raise ConfigError(f"model.rope_scaling.type={kind!r} is not one of none, linear, ntk, yarn, llama3")
    if cfg.factor < 1.0:
        raise ConfigError(f"model.rope_scaling.factor={cfg.factor} must be >= 1 (new length / original length)")
    old = dict(args.rope_scaling or {})
    orig = int(cfg.original_max_position_embeddings or old.get("original_max_position_embeddings")
               or args.max_position_embeddings)
    if old:
        log.warning("model already has rope_scaling %s; replacing it with %s factor %s over original length %d",
                    old, kind, cfg.factor, orig)
    new_max = int(max_position_embeddings or round(orig * cfg.factor))
    theta = float(old.get("rope_theta", args.rope_theta))
    if kind == "ntk":
        d = args.head_dim
        theta = theta * cfg.factor ** (d / (d - 2))
        log.info("static NTK-aware RoPE: rope_theta %s -> %s (factor %s, head_dim %d)", args.rope_theta, theta, cfg.factor, d)
        return dataclasses.replace(args, rope_theta=theta, rope_scaling=None, max_position_embeddings=new_max)
    rs: dict = {"rope_type": kind, "factor": float(cfg.factor)}
    if kind == "yarn":
        rs.update(original_max_position_embeddings=orig, beta_fast=float(cfg.beta_fast), beta_slow=float(cfg.beta_slow))
    elif kind == "llama3":
        if new_max <= orig:
            raise ConfigError(f"llama3 RoPE needs max_position_embeddings={new_max} > original {orig}; "
                             "raise model.rope_scaling.factor or model.max_position_embeddings")
        rs.update(original_max_position_embeddings=orig, low_freq_factor=float(cfg.low_freq_factor),
                  high_freq_factor=float(cfg.high_freq_factor))
    log.info("RoPE scaling %s; max_position_embeddings %d -> %d", rs, args.max_position_embeddings, new_max)
    return dataclasses.replace(args, rope_theta=theta, rope_scaling=rs, max_position_embeddings=new_max)
