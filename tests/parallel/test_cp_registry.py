"""The registered 'ring' / 'ulysses' / 'hybrid' entries on one rank, and config validation before the first step."""

from __future__ import annotations

import pytest
import torch

from cp_reference import random_cu_seqlens
from longreach.attention import registry
from longreach.attention.context import AttnContext
from longreach.models.llama import LlamaForCausalLM, ModelArgs
from longreach.parallel.comm_count import Comm
from longreach.parallel.mesh import validate_parallel
from longreach.parallel.plan import ShardPlan


@pytest.mark.parametrize("name", ["ring", "ulysses", "hybrid"])
def test_single_rank_fallback_matches_dense_model(name):
    args = ModelArgs(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8)
    b, s = 2, 29
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (b, s), generator=g)
    cu = random_cu_seqlens(b, s, g)
    ctx = AttnContext(causal=True, cu_seqlens=cu)
    pos = torch.zeros(b * s, dtype=torch.long)
    for a, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        pos[a:e] = torch.arange(e - a)
    pos = pos.view(b, s)
    outs = {}
    for attn in ("dense", name):
        m = LlamaForCausalLM(args, attention=attn).init_weights(generator=torch.Generator().manual_seed(1))
        logits = m(ids, pos, ctx)
        logits.square().mean().backward()
        outs[attn] = (logits, m.model.layers[0].self_attn.q_proj.weight.grad)
    torch.testing.assert_close(outs[name][0], outs["dense"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[name][1], outs["dense"][1], atol=1e-6, rtol=1e-4)


def test_registered_entry_refuses_a_mismatched_plan():
    plan = ShardPlan(batch_size=1, seq_len=8, ring=1, ulysses=1, ring_rank=0, ulysses_rank=0)
    info = plan.attn_info(strategy="ring", ring_group=None, ulysses_group=None, comm=Comm())
    x = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="set model.attention='ring'"):
        registry.get("ulysses")(x, x, x, ctx=AttnContext(parallel=info))
    with pytest.raises(ValueError, match="takes no model.attention_options"):
        registry.get("ring")(x, x, x, ctx=AttnContext(parallel=info), window=3)
    out = registry.get("ring")(x, x, x, ctx=AttnContext(parallel=info))
    assert out.shape == x.shape


def test_validate_parallel_names_the_field_and_pads():
    ok = dict(cp=4, ulysses=2, strategy="hybrid", world_size=8, num_heads=8, num_kv_heads=2, seq_len=100)
    assert validate_parallel(**ok) == 104  # 2 * ring(2) * ulysses(2) = 8 divides 104
    with pytest.raises(ValueError, match=r"parallel.cp=4 does not divide the world size 6"):
        validate_parallel(**{**ok, "world_size": 6})
    with pytest.raises(ValueError, match=r"parallel.ulysses=4 does not divide the model's 6 attention heads"):
        validate_parallel(**{**ok, "ulysses": 4, "num_heads": 6, "num_kv_heads": 6})
    with pytest.raises(ValueError, match="neither divide"):
        validate_parallel(**{**ok, "ulysses": 4, "num_heads": 12, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="parallel.strategy=ulysses needs parallel.ulysses == parallel.cp"):
        validate_parallel(**{**ok, "strategy": "ulysses"})
    # Ulysses degree above the KV heads is taken (heads replicated), not refused
    assert validate_parallel(**{**ok, "strategy": "ulysses", "ulysses": 4, "num_kv_heads": 2}) == 104
