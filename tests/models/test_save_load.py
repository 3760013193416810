"""HF directory round trips on tiny random Llama / Qwen2 / Mistral models: transformers -> ours and
ours -> transformers give the same fp32 logits, with and without RoPE scaling, truncation, sharding."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from longreach.launch.config import ModelConfig, RopeScalingConfig
from longreach.models import load_model, save_pretrained

from model_io_helpers import hf_logits, our_logits, rng_ids, tiny_hf_model

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,extra", [("llama", {}), ("llama", {"tie_word_embeddings": True, "mlp_bias": True}),
                                        ("qwen2", {}), ("mistral", {"sliding_window": None})])
def test_hf_to_ours_to_hf(tmp_path, kind, extra):
    hf = tiny_hf_model(kind, **extra)
    hf.save_pretrained(tmp_path / "hf")
    ours, tok = load_model(ModelConfig(path=str(tmp_path / "hf")))
    assert tok is None and ours.args.model_type == kind
    ids = rng_ids(hf.config.vocab_size)
    ref = hf_logits(hf, ids)
    torch.testing.assert_close(our_logits(ours, ids), ref, **TOL, msg=f"{kind}: ours vs transformers")
    if kind == "qwen2":
        assert ours.model.layers[0].self_attn.q_proj.bias is not None

    save_pretrained(ours, None, tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(back) is type(hf)
    torch.testing.assert_close(hf_logits(back, ids), ref, **TOL, msg=f"{kind}: re-saved vs transformers")
    if extra.get("tie_word_embeddings"):
        from safetensors import safe_open

        with safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys()
        assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("scaling", [RopeScalingConfig(type="yarn", factor=4.0), RopeScalingConfig(type="linear", factor=2.0),
                                     RopeScalingConfig(type="llama3", factor=8.0), RopeScalingConfig(type="ntk", factor=4.0)],
                         ids=lambda c: c.type)
def test_rope_scaled_save_matches_transformers(tmp_path, kind, scaling):
    hf = tiny_hf_model(kind)
    hf.save_pretrained(tmp_path / "hf")
    ours, _ = load_model(ModelConfig(path=str(tmp_path / "hf"), rope_scaling=scaling))
    assert ours.args.max_position_embeddings == 256 * scaling.factor
    ids = rng_ids(hf.config.vocab_size, n=40)
    pos = torch.arange(40).expand(2, 40) * 17  # positions beyond the original 256, where the scalings differ
    with torch.no_grad():
        mine = ours(ids, pos)
        unscaled = hf(input_ids=ids, position_ids=pos).logits
    assert (mine - unscaled).abs().max() > 1e-3, "rope scaling had no effect"
    save_pretrained(ours, None, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["max_position_embeddings"] == ours.args.max_position_embeddings
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        theirs = back(input_ids=ids, position_ids=pos).logits
    torch.testing.assert_close(mine, theirs, **TOL, msg=f"{kind} {scaling.type}")
    # and our loader reads the scaled directory back to the same model
    again, _ = load_model(ModelConfig(path=str(tmp_path / "ours")))
    assert again.args.rope_scaling == ours.args.rope_scaling and again.args.rope_theta == ours.args.rope_theta
    with torch.no_grad():
        torch.testing.assert_close(again(ids, pos), mine, rtol=0, atol=0)


def test_sharded_truncated_and_bf16(tmp_path):
    hf = tiny_hf_model("mistral", num_hidden_layers=3, sliding_window=None)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ids = rng_ids(hf.config.vocab_size)
    full, _ = load_model(ModelConfig(path=str(tmp_path / "hf")))
    torch.testing.assert_close(our_logits(full, ids), hf_logits(hf, ids), **TOL)

    two, _ = load_model(ModelConfig(path=str(tmp_path / "hf"), num_layers=2))
    assert two.args.num_hidden_layers == 2 and len(two.model.layers) == 2
    hf.model.layers = hf.model.layers[:2]  # the same weights with the last layer dropped
    hf.config.num_hidden_layers = 2
    torch.testing.assert_close(our_logits(two, ids), hf_logits(hf, ids), **TOL)

    bf, _ = load_model(ModelConfig(path=str(tmp_path / "hf")), dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters())
    assert bf.model.rotary_emb.inv_freq.dtype == torch.float32  # angles stay fp32
    err = (our_logits(bf, ids).float() - our_logits(full, ids)).abs().max()
    assert 0 < err < 0.1, err


def test_attention_plan_applied(tmp_path):
    hf = tiny_hf_model("llama", num_hidden_layers=3)
    hf.save_pretrained(tmp_path / "hf")
    m, _ = load_model(ModelConfig(path=str(tmp_path / "hf"), attention="dense", attention_layers={"-1": "dense"}))
    assert m.attention_names == ["dense"] * 3
    assert all(not p.is_meta for p in m.parameters())
    assert m.lm_head.weight.requires_grad and m.model.layers[0].self_attn.q_proj.weight.requires_grad
