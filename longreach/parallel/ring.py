"""Ring attention over the zigzag layout: KV rotates around the ring with ``batch_isend_irecv`` while the current
block computes; partial (out, lse) merge in fp32; the backward runs its own ring in which dK/dV accumulators
(fp32) travel with the KV blocks and arrive home after a full lap.

Works on *slot* tokens (see ``plan.py``): each ring rank's queries are its slot's ``2c`` tokens (after Ulysses'
all-to-all in the hybrid strategy), and the visiting KV is another slot's. Each slot is two zigzag chunks, so a
(query slot, key slot) pair is four sub-blocks; sub-blocks that are fully masked (key chunk wholly after the
query chunk, or no shared document) are skipped. With the causal zigzag this is the known schedule: the
diagonal step computes 3 of 4 sub-blocks, a step with an earlier slot computes the first key chunk only, a step
with a later slot the second query chunk only, i.e. every rank does the same work.

Local blocks: the Triton flash kernels (``kernel_block.py``: varlen segments per sub-block, fp32 out/lse, the
backward given the final merged rows) for bf16/fp16 on GPU or under the interpreter; the plain-torch block
(``local.py``, fp64-capable: the exactness tests) otherwise.

Collectives (R = ring size > 1): forward R-1 ring exchanges (K and V stacked in one buffer, heads never
repeated for GQA); backward R-1 KV exchanges + R dK/dV exchanges.
"""

from __future__ import annotations

from typing import Optional

import torch

from .kernel_block import (block_backward, block_backward_into, block_forward, block_forward_into, block_segments,
                           use_block_kernel)
from .local import local_attention, local_attention_backward
from .merge import merge_
from .plan import CPAttnInfo

_KV_TAG, _DKV_TAG = 0, 1


def block_pairs(info: CPAttnInfo, me: int, src: int, causal: bool) -> list[tuple[slice, slice]]:
    """(query slice, key slice) sub-blocks of slot ``me`` attending slot ``src`` that are not fully masked (cached
    on the info: every layer of the step asks the same)."""
    key = ("pairs", me, src, causal)
    if key not in info.block_cache:
        info.block_cache[key] = _block_pairs(info, me, src, causal)
    return info.block_cache[key]


def _block_pairs(info: CPAttnInfo, me: int, src: int, causal: bool) -> list[tuple[slice, slice]]:
    pos, doc = info.slot_pos, info.slot_doc
    n = pos.shape[1]
    h = n // 2
    halves = [(0, h), (h, n)] if h > 0 else [(0, n)]
    pairs = []
    for qa, qe in halves:
        for ka, ke in halves:
            qp, kp = pos[me, qa:qe], pos[src, ka:ke]
            if causal and int(kp.min()) > int(qp.max()):
                continue
            if doc is not None:
                qd, kd = doc[me][:, qa:qe], doc[src][:, ka:ke]
                # document ids rise along a row, so min/max ranges decide overlap per row
                overlap = (kd.min(1).values <= qd.max(1).values) & (qd.min(1).values <= kd.max(1).values)
                if not bool(overlap.any()):
                    continue
            pairs.append((slice(qa, qe), slice(ka, ke)))
    return pairs


def _mask_args(info: CPAttnInfo, pos: torch.Tensor, doc: Optional[torch.Tensor], me: int, src: int, qs: slice,
               ks: slice) -> dict:
    return dict(q_pos=pos[me, qs], k_pos=pos[src, ks],
                q_doc=None if doc is None else doc[me][:, qs], k_doc=None if doc is None else doc[src][:, ks])


def _segments(info: CPAttnInfo, me: int, src: int, qs: slice, ks: slice, causal: bool):
    """Kernel segments of one (query, key) block of slots ``me`` x ``src``, or None (not one kernel call)."""
    doc = info.slot_doc
    return block_segments(info.slot_pos[me, qs], info.slot_pos[src, ks], None if doc is None else doc[me][:, qs],
                          None if doc is None else doc[src][:, ks], causal)


def kernel_pairs(info: CPAttnInfo, me: int, src: int, causal: bool) -> list[tuple[slice, slice, object]]:
    """The step's work for the kernels: ``(query slice, key slice, segments or None)``, sub-blocks of
    ``block_pairs`` joined into as few kernel calls as their masks allow (None: that sub-block runs on the torch
    block). Joined, the zigzag's diagonal step is one causal call over the slot (positions rise along it), a step
    with an earlier slot one call of all queries x its first chunk, a later slot one call of the second query chunk
    x all its keys. Cached on the info (every layer of the step asks the same)."""
    key = ("kernel", me, src, causal)
    if key in info.block_cache:
        return info.block_cache[key]
    fine = block_pairs(info, me, src, causal)
    n = info.slot_pos.shape[1]
    whole = slice(0, n)
    span = lambda s_: (s_.start, s_.stop)  # noqa: E731  (slices are not hashable before Python 3.12)
    left = {(span(qs), span(ks)) for qs, ks in fine}
    out = []

    def take(qs: slice, ks: slice, parts: set) -> bool:
        segs = _segments(info, me, src, qs, ks, causal)
        if segs is None:
            return False
        if segs.work:
            out.append((qs, ks, segs))
        left.difference_update(parts)
        return True

    halves = sorted({span(qs) for qs, _ in fine} | {span(ks) for _, ks in fine})
    if len(fine) > 1:
        take(whole, whole, set(left))
    for h in halves:  # all queries x one key half, then one query half x all keys
        both = {(q, h) for q in halves}
        if len(halves) == 2 and both <= left:
            take(whole, slice(*h), both)
    for h in halves:
        both = {(h, k) for k in halves}
        if len(halves) == 2 and both <= left:
            take(slice(*h), whole, both)
    for qs, ks in fine:
        if (span(qs), span(ks)) in left:
            segs = _segments(info, me, src, qs, ks, causal)
            if segs is None or segs.work:
                out.append((qs, ks, segs))
    info.block_cache[key] = out
    return out


def _one_call(info: CPAttnInfo, causal: bool, n: int):
    """Segments when the whole of a one-slot ring is one kernel call over the slot (Ulysses, one rank), else None."""
    if info.ring_size != 1:
        return None
    work = kernel_pairs(info, 0, 0, causal)
    if len(work) == 1 and work[0][2] is not None and (work[0][0].start, work[0][0].stop) == (0, n) and \
            (work[0][1].start, work[0][1].stop) == (0, n):
        return work[0][2]
    return None


def _masks_on(info: CPAttnInfo, dev: torch.device):
    """Slot positions and document ids on ``dev`` for the torch block, copied once per step (not per layer)."""
    key = ("masks", str(dev))
    if key not in info.block_cache:
        info.block_cache[key] = (info.slot_pos.to(dev),
                                 None if info.slot_doc is None else info.slot_doc.to(dev))
    return info.block_cache[key]


def _wait(reqs) -> None:
    for r in reqs or ():
        r.wait()


class RingAttention(torch.autograd.Function):
    """q [B, n, Hq, D], k/v [B, n, Hkv, D] (this rank's slot) -> out [B, n, Hq, D] (q.dtype), lse [B, Hq, n] (fp32/64)."""

    @staticmethod
    def forward(ctx, q, k, v, info: CPAttnInfo, causal: bool, scale: float):
        ring, me = info.ring_size, info.ring_rank
        dev = q.device
        pos, doc = _masks_on(info, dev)
        ct = torch.float64 if q.dtype == torch.float64 else torch.float32
        b, n, hq, d = q.shape
        direct = _one_call(info, causal, n) if use_block_kernel(q) else None
        if direct is not None:  # one slot, one call: the kernel writes the final out; nothing to merge
            out, lse = block_forward(q, k, v, direct, scale, out_dtype=q.dtype)
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.info, ctx.causal, ctx.scale, ctx.direct = info, causal, scale, direct
            ctx.mark_non_differentiable(lse)
            return out, lse
        out = torch.zeros(b, n, hq, d, dtype=ct, device=dev)
        lse = torch.full((b, hq, n), float("-inf"), dtype=ct, device=dev)
        kv = torch.stack([k, v]).contiguous()  # [2, B, n, Hkv, D]: one message per hop, KV heads as they are
        kernel = use_block_kernel(q)  # the Triton block (bf16/fp16 on GPU or the interpreter), else plain torch
        for step in range(ring):
            src = (me - step) % ring
            reqs = None
            if step < ring - 1:  # start the next hop before computing this one (overlap)
                nxt = torch.empty_like(kv)
                reqs = info.comm.ring_exchange([kv], [nxt], group=info.ring_group, tag=_KV_TAG)
            work = kernel_pairs(info, me, src, causal) if kernel else \
                [(qs, ks, None) for qs, ks in block_pairs(info, me, src, causal)]
            for qs, ks, segs in work:
                if segs is not None and b == 1:  # the kernel merges into the accumulators itself
                    block_forward_into(q[:, qs], kv[0][:, ks], kv[1][:, ks], segs, scale, out[:, qs], lse[:, :, qs])
                    continue
                if segs is not None:
                    o, l = block_forward(q[:, qs], kv[0][:, ks], kv[1][:, ks], segs, scale)
                else:
                    o, l = local_attention(q[:, qs], kv[0][:, ks], kv[1][:, ks], scale=scale, causal=causal,
                                           **_mask_args(info, pos, doc, me, src, qs, ks))
                merge_(out[:, qs], lse[:, :, qs], o, l)
            if reqs is not None:
                _wait(reqs)
                kv = nxt
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.info, ctx.causal, ctx.scale, ctx.direct = info, causal, scale, None
        ctx.mark_non_differentiable(lse)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        info, causal, scale = ctx.info, ctx.causal, ctx.scale
        if ctx.direct is not None:
            dq, dk, dv = block_backward(q, k, v, out, lse, dout, ctx.direct, scale, grad_dtype=None)
            return dq, dk, dv, None, None, None
        ring, me = info.ring_size, info.ring_rank
        dev = q.device
        pos, doc = _masks_on(info, dev)
        ct = out.dtype
        dq = torch.zeros(q.shape, dtype=ct, device=dev)
        kv = torch.stack([k, v]).contiguous()
        kernel = use_block_kernel(q)
        dkv = None  # fp32 dK/dV of the slot whose KV we hold; travels with it
        dkv_reqs, dkv_in = None, None
        for step in range(ring):
            src = (me - step) % ring
            kv_reqs = None
            if step < ring - 1:
                nxt = torch.empty_like(kv)
                kv_reqs = info.comm.ring_exchange([kv], [nxt], group=info.ring_group, tag=_KV_TAG)
            contrib = torch.zeros((2,) + tuple(k.shape), dtype=ct, device=dev)
            work = kernel_pairs(info, me, src, causal) if kernel else \
                [(qs, ks, None) for qs, ks in block_pairs(info, me, src, causal)]
            for qs, ks, segs in work:
                if segs is not None and q.shape[0] == 1:  # the kernels add into the accumulators themselves
                    block_backward_into(q[:, qs], kv[0][:, ks], kv[1][:, ks], out[:, qs], lse[:, :, qs], dout[:, qs],
                                        segs, scale, dq[:, qs], contrib[0][:, ks], contrib[1][:, ks])
                    continue
                if segs is not None:
                    gq, gk, gv = block_backward(q[:, qs], kv[0][:, ks], kv[1][:, ks], out[:, qs], lse[:, :, qs],
                                                dout[:, qs], segs, scale)
                else:
                    gq, gk, gv = local_attention_backward(
                        q[:, qs], kv[0][:, ks], kv[1][:, ks], out[:, qs], lse[:, :, qs], dout[:, qs], scale=scale,
                        causal=causal, **_mask_args(info, pos, doc, me, src, qs, ks))
                dq[:, qs] += gq
                contrib[0][:, ks] += gk
                contrib[1][:, ks] += gv
            if step == 0:
                dkv = contrib
            else:  # the accumulator of slot `src` arrived from the previous rank while we computed
                _wait(dkv_reqs)
                dkv = dkv_in.add_(contrib)
            if ring > 1:  # pass it on; after the last step it travels its final hop home
                dkv_in = torch.empty_like(dkv)
                dkv_reqs = info.comm.ring_exchange([dkv], [dkv_in], group=info.ring_group, tag=_DKV_TAG)
            if kv_reqs is not None:
                _wait(kv_reqs)
                kv = nxt
        if ring > 1:
            _wait(dkv_reqs)
            dkv = dkv_in
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, info: CPAttnInfo, causal: bool,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring attention over ``info.ring_group`` (slot tokens): out [B, n, Hq, D], lse [B, Hq, n]."""
    return RingAttention.apply(q, k, v, info, causal, scale)
