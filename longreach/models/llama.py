"""Our Llama-family decoder (Llama, Qwen2, Mistral): plain modules whose parameter names match
Hugging Face's ``LlamaForCausalLM`` so state dicts move across unchanged. Attention goes through the
registry; whether it is dense, sparse, linear or context-parallel is decided by the layer's name and the
per-batch ``AttnContext``, never here."""

from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..attention import registry
from ..attention.context import AttnContext
from . import rope


@dataclass
class ModelArgs:
    """Architecture hyper-parameters (a subset of HF's config with the same meaning)."""

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    """q/k/v projections carry a bias (Qwen2)."""
    mlp_bias: bool = False
    model_type: str = "llama"
    """'llama', 'qwen2' or 'mistral': only decides the config written on save."""
    rope_scaling: Optional[dict] = None
    """HF-style rope scaling dict ({'rope_type': 'linear'|'dynamic'|'yarn'|'llama3', 'factor': ..., ...})."""
    sliding_window: Optional[int] = None
    """Mistral/Qwen2 sliding-window size from the loaded config, kept so a save writes it back; our attention
    is full causal (identical only for sequences <= sliding_window; ``models/load.py`` checks this)."""
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    torch_dtype: str = "float32"

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 like HF, cast back before the weight multiply
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables from position ids; the scaling recipe lives in ``models/rope.py``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        inv_freq, attention_scaling = rope.inv_freq_and_scaling(args)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_scaling = attention_scaling

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        # position_ids [B, S] -> cos/sin [B, S, D] computed in fp32 (bf16 angles lose whole radians at 100K positions)
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # [B, S, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D]; cos/sin [B, S, D]."""
    return x * cos[:, :, None] + _rotate_half(x) * sin[:, :, None]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, attn_name: str, attn_options: Optional[dict] = None):
        super().__init__()
        h, hq, hkv, d = args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = hq, hkv, d
        self.q_proj = nn.Linear(h, hq * d, bias=args.attention_bias)
        self.k_proj = nn.Linear(h, hkv * d, bias=args.attention_bias)
        self.v_proj = nn.Linear(h, hkv * d, bias=args.attention_bias)
        self.o_proj = nn.Linear(hq * d, h, bias=False)
        self.attn_name = attn_name
        self.impl = registry.build(registry.AttnSpec(attn_name, layer_idx, hq, hkv, d, dict(attn_options or {})))

    def project_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)  # [B, S, Hq, D]
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim)  # [B, S, Hkv, D]
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.project_qkv(x, cos, sin)
        out = self.impl(q, k, v, ctx=ctx)  # [B, S, Hq, D]
        return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, attn_name: str, attn_options: Optional[dict] = None):
        super().__init__()
        self.self_attn = Attention(args, layer_idx, attn_name, attn_options)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, cos, sin, ctx: AttnContext):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    """``model.*`` in HF naming: embeddings, layers, final norm."""

    def __init__(self, args: ModelArgs, attn_names: Sequence[str], attn_options: Sequence[Optional[dict]]):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(args, i, attn_names[i], attn_options[i]) for i in range(args.num_hidden_layers)
        )
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(args)


class LlamaForCausalLM(nn.Module):
    """Decoder-only LM. ``attention`` is one registry name for every layer or a per-layer list."""

    def __init__(self, args: ModelArgs, attention: str | Sequence[str] = "dense",
                 attention_options: Optional[dict | Sequence[Optional[dict]]] = None):
        super().__init__()
        n = args.num_hidden_layers
        names = [attention] * n if isinstance(attention, str) else list(attention)
        if len(names) != n:
            raise ValueError(f"attention plan has {len(names)} entries but the model has {n} layers")
        opts = attention_options if isinstance(attention_options, (list, tuple)) else [attention_options] * n
        self.args = args
        self.model = LlamaBody(args, names, opts)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: Optional[torch.Generator] = None) -> "LlamaForCausalLM":
        """HF-style random init (normal(0, std) weights, zero biases, unit norms) for models built from scratch."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif p.dim() >= 2 and ".impl." not in name:  # attention-module parameters keep their own init
                p.normal_(0.0, std, generator=generator)
        return self

    @property
    def attention_names(self) -> list[str]:
        return [layer.self_attn.attn_name for layer in self.model.layers]

    def hidden_states(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                      ctx: Optional[AttnContext] = None) -> torch.Tensor:
        """input_ids [B, S] int64, position_ids [B, S] (default 0..S-1) -> final-normed hidden [B, S, H]."""
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        ctx = ctx or AttnContext()
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(position_ids, x.dtype)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, ctx, use_reentrant=False)
            else:
                x = layer(x, cos, sin, ctx)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                ctx: Optional[AttnContext] = None) -> torch.Tensor:
        """Logits [B, S, V] in the model's dtype."""
        return self.lm_head(self.hidden_states(input_ids, position_ids, ctx))

    def loss_sum(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                 ctx: Optional[AttnContext] = None, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token cross-entropy over real tokens and their count.

        ``labels`` [B, S] are already shifted (label at t is the token at t+1; -100 = ignore), so a
        sequence sharded across ranks needs no shift at shard boundaries. Logits are computed ``chunk``
        tokens at a time in fp32, and under autograd each chunk is recomputed in the backward instead of kept,
        so a long sequence never holds [S, V] logits (at 64K tokens and a 128K vocabulary that is 32 GiB in fp32).
        """
        h = self.hidden_states(input_ids, position_ids, ctx).flatten(0, 1)  # [B*S, H]
        y = labels.flatten()
        total = h.new_zeros((), dtype=torch.float32)
        recompute = torch.is_grad_enabled() and h.requires_grad and h.shape[0] > chunk
        for a in range(0, h.shape[0], chunk):
            if recompute:
                part = checkpoint(self._chunk_loss, h[a:a + chunk], y[a:a + chunk], use_reentrant=False)
            else:
                part = self._chunk_loss(h[a:a + chunk], y[a:a + chunk])
            total = total + part
        return total, (y != -100).sum()

    def _chunk_loss(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.lm_head(h).float(), y, ignore_index=-100, reduction="sum")
