"""The training benchmark runs on CPU with a tiny model and reports both implementations."""

from __future__ import annotations

import json
import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")


def test_bench_train_cpu_tiny(tmp_path):
    from longreach.launch.bench.train import bench_train, hf_llama_from
    from longreach.models.llama import LlamaForCausalLM, ModelArgs

    args = ModelArgs(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    model = LlamaForCausalLM(args).init_weights(generator=torch.Generator().manual_seed(0))
    # the HF copy computes the same logits before any step
    ids = torch.randint(0, 128, (1, 32))
    torch.testing.assert_close(hf_llama_from(model)(ids).logits, model(ids), rtol=1e-4, atol=1e-5)
    out = tmp_path / "bench.json"
    r = bench_train(model, seq_len=32, steps=2, warmup=1, out_json=out, out_dir=str(tmp_path))
    saved = json.loads(out.read_text())
    for key in ("ours", "hf"):
        assert saved[key]["tokens_per_s"] > 0 and saved[key]["peak_mem_bytes"] > 0
        assert len(saved[key]["step_times_s"]) == 2
    assert saved["config"]["seq_len"] == 32 and r["speedup"] > 0
    assert not (tmp_path / "bench_train" / "checkpoints").exists()  # benchmarks write no checkpoints


def test_bench_train_flash_attention_no_hf_and_flops(tmp_path):
    """The 1B preset's FLOPs/token (6N + 6 L d S) and a run on the 'flash' attention without the HF peer."""
    from longreach.launch.bench.train import PRESETS, bench_train, train_flops_per_token
    from longreach.models.llama import LlamaForCausalLM, ModelArgs

    one_b = ModelArgs(**PRESETS["llama-1b"])
    with torch.device("meta"):
        n = sum(p.numel() for p in LlamaForCausalLM(one_b).parameters())  # tied head: embedding counted once
    assert 1.1e9 < n < 1.4e9
    assert abs(train_flops_per_token(one_b, 0) / (6 * n) - 1) < 0.01  # the embedding matrix is the LM head's matmul
    assert train_flops_per_token(one_b, 1000) - train_flops_per_token(one_b, 0) == 6 * 16 * 32 * 64 * 1000
    args = ModelArgs(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    model = LlamaForCausalLM(args).init_weights(generator=torch.Generator().manual_seed(0))
    r = bench_train(model, seq_len=32, steps=1, warmup=1, out_dir=str(tmp_path), attention="flash", with_hf=False)
    assert r["hf"] is None and r["speedup"] is None and r["ours"]["tokens_per_s"] > 0
    assert r["config"]["attention"] == "flash" and model.model.layers[0].self_attn.attn_name == "flash"
