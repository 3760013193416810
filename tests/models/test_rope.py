"""RoPE frequencies and scaling against transformers' own rope init functions (exact equality)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from longreach.launch.config import RopeScalingConfig
from longreach.models.llama import ModelArgs
from longreach.models.rope import apply_rope_scaling, inv_freq_and_scaling
from longreach.models.save import hf_config_dict

ARGS = ModelArgs(head_dim=64, rope_theta=100000.0, max_position_embeddings=2048)


def hf_rope(args: ModelArgs, seq_len=None):
    """transformers' (inv_freq, attention_scaling) for the config that save.py would write for ``args``."""
    cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config_dict(args).items() if k != "architectures"})
    kind = cfg.rope_parameters["rope_type"]
    if kind == "default":
        return transformers.models.llama.modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    return ROPE_INIT_FUNCTIONS[kind](cfg, None, seq_len=seq_len)


CASES = {
    "linear": RopeScalingConfig(type="linear", factor=4.0),
    "yarn": RopeScalingConfig(type="yarn", factor=8.0),
    "yarn_betas": RopeScalingConfig(type="yarn", factor=3.0, beta_fast=16.0, beta_slow=2.0),
    "llama3": RopeScalingConfig(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0),
    "llama3_orig": RopeScalingConfig(type="llama3", factor=4.0, original_max_position_embeddings=1024),
}


def test_default_matches_transformers():
    ours, s = inv_freq_and_scaling(ARGS)
    ref, s_ref = hf_rope(ARGS)
    assert ours.dtype == torch.float32 and ours.shape == (32,)
    assert torch.equal(ours, ref) and s == s_ref == 1.0


@pytest.mark.parametrize("name", sorted(CASES))
def test_scaled_matches_transformers(name):
    cfg = CASES[name]
    args = apply_rope_scaling(ARGS, cfg, 0)
    orig = cfg.original_max_position_embeddings or ARGS.max_position_embeddings
    assert args.max_position_embeddings == int(orig * cfg.factor)
    assert args.rope_scaling["rope_type"] == cfg.type and args.rope_scaling["factor"] == cfg.factor
    ours, s = inv_freq_and_scaling(args)
    ref, s_ref = hf_rope(args)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0, msg=f"{name} inv_freq")
    assert s == pytest.approx(s_ref, abs=0), name
    base, _ = inv_freq_and_scaling(ARGS)
    assert not torch.equal(ours, base), f"{name} left the frequencies unchanged"
    if cfg.type == "yarn":
        assert s == pytest.approx(0.1 * math.log(cfg.factor) + 1.0)


@pytest.mark.parametrize("seq_len", [1000, 2048, 5000, 16384])
def test_dynamic_matches_transformers_at_seq_len(seq_len):
    args = dataclasses.replace(ARGS, rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    ours, _ = inv_freq_and_scaling(args, seq_len=seq_len)
    ref, _ = hf_rope(args, seq_len=seq_len)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    if seq_len > ARGS.max_position_embeddings:
        assert not torch.equal(ours, inv_freq_and_scaling(ARGS)[0])


def test_dynamic_refused_for_models():
    args = dataclasses.replace(ARGS, rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    with pytest.raises(ValueError, match="ntk"):
        inv_freq_and_scaling(args)
    with pytest.raises(ValueError, match="dynamic"):
        apply_rope_scaling(ARGS, RopeScalingConfig(type="dynamic", factor=2.0), 0)


def test_ntk_folds_into_theta():
    args = apply_rope_scaling(ARGS, RopeScalingConfig(type="ntk", factor=4.0), 0)
    assert args.rope_scaling is None and args.max_position_embeddings == 8192
    assert args.rope_theta == pytest.approx(100000.0 * 4.0 ** (64 / 62), rel=1e-12)
    ours, _ = inv_freq_and_scaling(args)
    ref, _ = hf_rope(args)  # plain transformers with the changed rope_theta reproduces it
    assert torch.equal(ours, ref)
    # NTK-aware: highest frequency unchanged, lowest divided by ~factor
    base, _ = inv_freq_and_scaling(ARGS)
    assert ours[0] == base[0]
    assert (base[-1] / ours[-1]).item() == pytest.approx(4.0, rel=0.05)


def test_explicit_max_positions_and_replacing_scaling():
    a = apply_rope_scaling(ARGS, RopeScalingConfig(type="yarn", factor=2.0), 5000)
    assert a.max_position_embeddings == 5000 and a.rope_scaling["original_max_position_embeddings"] == 2048
    # a second extension is measured from the original pretraining length, not the stage-1 length
    b = apply_rope_scaling(a, RopeScalingConfig(type="yarn", factor=8.0), 0)
    assert b.rope_scaling["original_max_position_embeddings"] == 2048 and b.max_position_embeddings == 16384
    assert apply_rope_scaling(ARGS, RopeScalingConfig(), 0) is ARGS
    with pytest.raises(ValueError, match="model.rope_scaling.factor"):
        apply_rope_scaling(ARGS, RopeScalingConfig(type="linear", factor=0.5), 0)
