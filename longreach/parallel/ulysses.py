"""Ulysses: all-to-all that trades the sequence shard for a head shard and back.

Rank ``u`` of a Ulysses group of ``U`` holds tokens piece ``u`` with all heads; after :func:`seq_to_heads` it
holds all ``U`` pieces (concatenated in rank order, i.e. the slot's token order) with heads
``[u*H/U, (u+1)*H/U)``. GQA: KV heads are split the same way, which keeps each query head with its KV head when
``Hkv % U == 0``; when ``U > Hkv`` (and ``U % Hkv == 0``) each KV head is replicated ``U/Hkv`` times first, so
every rank still gets the KV head of its query heads (the replica gradients sum through autograd).
Head counts that do not split are refused before any communication, so no rank is left waiting.
"""

from __future__ import annotations

import torch

from .plan import CPAttnInfo


def check_heads(*, num_heads: int, num_kv_heads: int, ulysses: int) -> None:
    """Refuse head counts Ulysses cannot split, naming the field and the fix."""
    if ulysses <= 1:
        return
    if num_heads % ulysses:
        raise ValueError(
            f"parallel.ulysses={ulysses} does not divide the model's {num_heads} attention heads; use a "
            f"parallel.ulysses that divides {num_heads} (or parallel.strategy=ring / hybrid with a smaller ulysses)")
    if num_kv_heads % ulysses and ulysses % num_kv_heads:
        raise ValueError(
            f"parallel.ulysses={ulysses} and the model's {num_kv_heads} key/value heads neither divide each other; "
            f"use a parallel.ulysses that divides {num_kv_heads} or is a multiple of it")


def replicate_kv_heads(x: torch.Tensor, *, ulysses: int) -> torch.Tensor:
    """[B, S, Hkv, D] -> [B, S, max(Hkv, U), D]: repeat each KV head when the Ulysses degree exceeds the KV heads."""
    hkv = x.shape[2]
    return x if hkv >= ulysses else x.repeat_interleave(ulysses // hkv, dim=2)


def _seq_to_heads(x: torch.Tensor, info: CPAttnInfo) -> torch.Tensor:
    # x [..., S, H, D] -> [..., U*S, H/U, D]
    u = info.ulysses_size
    *lead, s, h, d = x.shape
    send = x.reshape(*lead, s, u, h // u, d).movedim(-3, 0).contiguous()  # [U, ..., S, H/U, D]
    recv = torch.empty_like(send)
    info.comm.all_to_all_single(recv, send, group=info.ulysses_group)  # recv[j] = tokens of rank j, my heads
    return recv.movedim(0, -4).reshape(*lead, u * s, h // u, d)


def _heads_to_seq(x: torch.Tensor, info: CPAttnInfo) -> torch.Tensor:
    # x [..., U*S, H/U, D] -> [..., S, H, D]
    u = info.ulysses_size
    *lead, us, hu, d = x.shape
    send = x.reshape(*lead, u, us // u, hu, d).movedim(-4, 0).contiguous()  # [U, ..., S, H/U, D]
    recv = torch.empty_like(send)
    info.comm.all_to_all_single(recv, send, group=info.ulysses_group)  # recv[j] = my tokens, heads of rank j
    return recv.movedim(0, -3).reshape(*lead, us // u, u * hu, d)


class SeqToHeads(torch.autograd.Function):
    """Sequence shard -> head shard; the backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, info: CPAttnInfo):
        ctx.info = info
        return _seq_to_heads(x, info)

    @staticmethod
    def backward(ctx, g):
        return _heads_to_seq(g, ctx.info), None


class HeadsToSeq(torch.autograd.Function):
    """Head shard -> sequence shard; the backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, info: CPAttnInfo):
        ctx.info = info
        return _heads_to_seq(x, info)

    @staticmethod
    def backward(ctx, g):
        return _seq_to_heads(g, ctx.info), None


def heads_to_seq_lse(lse: torch.Tensor, info: CPAttnInfo) -> torch.Tensor:
    """lse [B, H/U, U*S] -> [B, S, H] -> [B, H, S] (no grad; only for callers that ask for lse)."""
    return _heads_to_seq(lse.transpose(1, 2)[..., None], info)[..., 0].transpose(1, 2)
