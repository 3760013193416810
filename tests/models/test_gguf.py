"""GGUF reading on a tiny GGUF written here the way llama.cpp's converter writes one (q/k permuted for its
RoPE layout, some tensors Q8_0): exact weights back, same logits as transformers' own GGUF loader, caching."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers

from longreach.launch.config import ModelConfig
from longreach.models import load_model
from longreach.models.gguf import convert_cached, read_gguf

from model_io_helpers import hf_logits, our_logits, rng_ids, tiny_hf_model

_NAMES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
          "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
          "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
          "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
          "mlp.down_proj.weight": "ffn_down.weight"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute, verbatim in effect
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, hf, arch: str = "llama") -> None:
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, t in hf.state_dict().items():
        a = t.numpy().astype(np.float32)
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{_NAMES[rest]}"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        if "attn_q" in gname:
            a = llama_cpp_permute(a, c.num_attention_heads)
        elif "attn_k" in gname:
            a = llama_cpp_permute(a, c.num_key_value_heads)
        if "ffn_" in gname and a.ndim == 2 or gname == "token_embd.weight":
            w.add_tensor(gname, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    hf = tiny_hf_model("llama", tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path, hf)
    return hf, path


def test_read_gguf_unpermutes_exactly(tiny_gguf):
    hf, path = tiny_gguf
    sd, args = read_gguf(path)
    ref = hf.state_dict()
    assert set(sd) == set(ref)
    assert (args.num_hidden_layers, args.num_key_value_heads, args.head_dim) == (2, 2, 16)
    assert args.rms_norm_eps == 1e-5 and args.tie_word_embeddings is False
    for k, v in sd.items():
        assert v.dtype == torch.float32 and v.shape == ref[k].shape, k
        if "self_attn" in k or "norm" in k or k == "lm_head.weight":  # stored F32: bit-exact
            assert torch.equal(v, ref[k]), k
        else:  # Q8_0: ~1% of each block's max
            torch.testing.assert_close(v, ref[k], rtol=0, atol=0.02 * ref[k].abs().max().item(), msg=k)


def test_tiny_gguf_matches_transformers_gguf_loader(tiny_gguf, tmp_path):
    _, path = tiny_gguf
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    ours, tok = load_model(ModelConfig(path=str(path)), cache_dir=tmp_path)
    ids = rng_ids(theirs.config.vocab_size)
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(theirs, ids), rtol=1e-5, atol=1e-5)
    # second load: the cached safetensors directory, no dequantisation
    cached = convert_cached(path, tmp_path)
    assert (cached / "model.safetensors").is_file() and (cached / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directories left behind"
    again, _ = load_model(ModelConfig(path=str(path)), cache_dir=tmp_path)
    torch.testing.assert_close(our_logits(again, ids), our_logits(ours, ids), rtol=0, atol=0)


def test_unsupported_gguf_arch_fails_before_dequantising(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match=r"general.architecture='gpt2'.*supported: llama"):
        load_model(ModelConfig(path=str(tmp_path / "m.gguf")), cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("gguf-*/"))


def test_config_errors_checked_before_dequantising(tiny_gguf, tmp_path):
    _, path = tiny_gguf
    with pytest.raises(ValueError, match="model.attention_layers index 7 is out of range"):
        load_model(ModelConfig(path=str(path), attention_layers={"7": "dense"}), cache_dir=tmp_path)
    assert not list(tmp_path.glob("gguf-*/")), "conversion ran although the config was bad"
