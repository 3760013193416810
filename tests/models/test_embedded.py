"""The embedded SmolLM2-135M GGUF: our dequantised model against transformers' own GGUF loader, and
GGUF -> ours -> save_pretrained -> transformers (plain and RoPE-scaled) with the same fp32 logits."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from longreach.launch.config import ModelConfig, RopeScalingConfig
from longreach.models import load_model, save_pretrained
from longreach.models.gguf import embedded_path

from model_io_helpers import smol_ids

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32, |logits| up to ~30; identical weights give identical logits in practice


def test_args_and_tokenizer(smol):
    model, tok = smol
    a = model.args
    assert (a.num_hidden_layers, a.hidden_size, a.num_attention_heads, a.num_key_value_heads) == (30, 576, 9, 3)
    assert (a.rope_theta, a.rms_norm_eps, a.vocab_size, a.tie_word_embeddings) == (100000.0, 1e-5, 49152, True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tok.decode(tok("The capital of France is").input_ids) == "The capital of France is"
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)


@pytest.mark.slow  # transformers' loader parses the file three times and dequantises it: ~25-80 s on 2 cores
def test_matches_transformers_gguf_loader(smol):
    model, tok = smol
    path = embedded_path("embedded:smollm2-135m")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    ref_sd, ours_sd = theirs.state_dict(), model.state_dict()
    for k, v in ours_sd.items():  # same dequantisation and the same q/k un-permutation: bit-identical
        assert torch.equal(v, ref_sd[k]), k
    ids = smol_ids(tok)
    with torch.no_grad():
        ref = theirs(input_ids=ids).logits
        torch.testing.assert_close(model(ids), ref, **TOL)
    # sanity: greedy continuation (printed, not asserted)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    print("greedy:", repr(tok.decode(ids[0])))


def test_save_then_transformers(smol, tmp_path):
    model, tok = smol
    ids = smol_ids(tok)
    save_pretrained(model, tok, tmp_path / "out")
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files, files
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model(ids), **TOL)
    back_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert back_tok("The capital of France").input_ids == tok("The capital of France").input_ids


def test_yarn_scaled_save_then_transformers(smol_cache, tmp_path):
    cfg = ModelConfig(rope_scaling=RopeScalingConfig(type="yarn", factor=4.0), num_layers=6)
    model, tok = load_model(cfg, cache_dir=smol_cache)
    assert model.args.max_position_embeddings == 32768 and model.args.num_hidden_layers == 6
    save_pretrained(model, tok, tmp_path / "yarn")
    saved = json.loads((tmp_path / "yarn" / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == "yarn" and saved["num_hidden_layers"] == 6
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "yarn").eval()
    ids = smol_ids(tok)
    pos = torch.arange(ids.shape[1])[None] * 500  # far positions, where yarn differs from plain RoPE
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, position_ids=pos).logits, model(ids, pos), **TOL)
