"""The ring's local block on the Triton flash kernels (``longreach.kernels.flash``): the same maths as
``local.py`` (out and lse in fp32, the backward given the final merged out/lse), run as one varlen kernel call.

``local.py`` describes a block's mask per token (positions, document ids); the kernels take document segments
(``cu_seqlens`` for q and for k, document i of q attending document i of k) and one mask kind per call:
``'causal'`` (top-left aligned inside each pair: the diagonal) or ``'full'``. ``block_segments`` turns the first
into the second once per (query slot half, key slot half) and batch of the plan: every document present in both
halves is either wholly before the queries (full), wholly after (skipped: its q rows get an empty key segment,
its keys an empty query segment), or on the same positions (causal). The zigzag layouts (global and per
document) only produce these cases; a block that mixes full and causal documents, or anything else, returns
None and the caller keeps the plain-torch block.

Used for bf16/fp16 on CUDA, and on CPU under ``TRITON_INTERPRET=1`` (CI runs the real kernel code through the
ring there). ``LONGREACH_RING_KERNEL=0`` keeps the plain-torch block everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch

_KERNEL_DTYPES = (torch.bfloat16, torch.float16)
_KERNEL_HEAD_DIMS = (16, 32, 64, 128)


def use_block_kernel(q: torch.Tensor) -> bool:
    """True when the ring's local blocks should run on the Triton kernels for tensors like ``q``."""
    from ..kernels.flash import triton_enabled

    if os.environ.get("LONGREACH_RING_KERNEL", "1") == "0":
        return False
    return triton_enabled(q) and q.dtype in _KERNEL_DTYPES and q.shape[-1] in _KERNEL_HEAD_DIMS


@dataclass
class BlockSegments:
    """One block's documents as kernel segments over the flattened (batch x tokens) rows of q and k."""

    mask: str
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    work: bool = True
    """False when no document pairs queries with keys (nothing to compute)."""
    _on: dict = field(default_factory=dict, repr=False)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._on:
            self._on[key] = (self.cu_q.to(device), self.cu_k.to(device))
        return self._on[key]


def _runs(doc: Optional[torch.Tensor], n: int) -> Optional[list[tuple[int, int, int]]]:
    """(document id, start, end) of the runs of equal ids along one row (one run when there are no ids); None
    when a document comes back after another (the per-document layout's two halves): not one segment each."""
    if doc is None:
        return [(0, 0, n)] if n else []
    ids, counts = torch.unique_consecutive(doc, return_counts=True)
    if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
        return None
    out, start = [], 0
    for i, c in zip(ids.tolist(), counts.tolist()):
        out.append((i, start, start + c))
        start += c
    return out


def block_segments(q_pos: torch.Tensor, k_pos: torch.Tensor, q_doc: Optional[torch.Tensor],
                   k_doc: Optional[torch.Tensor], causal: bool) -> Optional[BlockSegments]:
    """Kernel segments of one block (CPU tensors: q_pos [Sq], k_pos [Sk] shared by the rows; q_doc [B, Sq],
    k_doc [B, Sk] or None), or None when the block's mask is not one kernel call (module docstring)."""
    q_pos, k_pos = q_pos.cpu(), k_pos.cpu()
    sq, sk = q_pos.numel(), k_pos.numel()
    rows = 1 if q_doc is None else q_doc.shape[0]
    cu_q, cu_k, kinds = [0], [0], set()

    def emit(qn: int, kn: int):
        cu_q.append(cu_q[-1] + qn)
        cu_k.append(cu_k[-1] + kn)

    for b in range(rows):
        qr = _runs(None if q_doc is None else q_doc[b].cpu(), sq)
        kr = _runs(None if k_doc is None else k_doc[b].cpu(), sk)
        if qr is None or kr is None:
            return None
        i = j = 0
        while i < len(qr) or j < len(kr):  # document ids rise along a row: merge the two run lists in order
            qd = qr[i][0] if i < len(qr) else None
            kd = kr[j][0] if j < len(kr) else None
            if kd is None or (qd is not None and qd < kd):
                emit(qr[i][2] - qr[i][1], 0)
                i += 1
                continue
            if qd is None or kd < qd:
                emit(0, kr[j][2] - kr[j][1])
                j += 1
                continue
            (_, qa, qe), (_, ka, ke) = qr[i], kr[j]
            qp, kp = q_pos[qa:qe], k_pos[ka:ke]
            if not causal or int(kp.max()) < int(qp.min()):
                kinds.add("full")
                emit(qe - qa, ke - ka)
            elif int(kp.min()) > int(qp.max()):  # keys after the queries: nothing visible
                emit(qe - qa, 0)
                emit(0, ke - ka)
            elif qe - qa == ke - ka and torch.equal(qp, kp):
                kinds.add("causal")
                emit(qe - qa, ke - ka)
            else:
                return None
            i += 1
            j += 1
    if len(kinds) > 1:
        return None
    lens_q = [e - a for a, e in zip(cu_q[:-1], cu_q[1:])]
    lens_k = [e - a for a, e in zip(cu_k[:-1], cu_k[1:])]
    return BlockSegments(mask=kinds.pop() if kinds else "full",
                         cu_q=torch.tensor(cu_q, dtype=torch.int32), cu_k=torch.tensor(cu_k, dtype=torch.int32),
                         max_q=max(lens_q + [0]), max_k=max(lens_k + [0]),
                         work=any(a > 0 and c > 0 for a, c in zip(lens_q, lens_k)))


def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segs: BlockSegments, scale: float,
                  out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> out [B, Sq, Hq, D] in ``out_dtype`` (fp32 for a block that is merged,
    as ``local_attention``; the input dtype for the one call of a one-slot ring), lse fp32 [B, Hq, Sq]."""
    from ..kernels.flash import lse_to_user, to_packed
    from ..kernels.flash import triton as tk

    cu_q, cu_k = segs.on(q.device)
    out, lse = tk.attention_forward(to_packed(q), to_packed(k), to_packed(v), cu_q, cu_k, segs.max_q,
                                    causal=segs.mask == "causal", scale=scale, out_dtype=out_dtype)
    return out.view(q.shape), lse_to_user(lse, q)


def block_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                   dout: torch.Tensor, segs: BlockSegments, scale: float,
                   grad_dtype: Optional[torch.dtype] = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This block's (dq, dk, dv) given the rows' FINAL merged out [B, Sq, Hq, D] and lse [B, Hq, Sq]: fp32 (summed
    over the ring's hops), or ``grad_dtype=None`` for the inputs' dtypes (a one-slot ring's one call)."""
    from ..kernels.flash import lse_from_user, to_packed
    from ..kernels.flash import triton as tk

    cu_q, cu_k = segs.on(q.device)
    dq, dk, dv = tk.attention_backward(to_packed(dout), to_packed(q), to_packed(k), to_packed(v), to_packed(out),
                                       lse_from_user(lse, q), cu_q, cu_k, segs.max_q, segs.max_k,
                                       causal=segs.mask == "causal", scale=scale, grad_dtype=grad_dtype)
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)


def block_forward_into(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segs: BlockSegments, scale: float,
                       out: torch.Tensor, lse: torch.Tensor) -> None:
    """Batch 1: merge this block into the running fp32 ``out`` [1, Sq, Hq, D] and ``lse`` [1, Hq, Sq] (views of the
    ring's accumulators) inside the kernel, in place: no block result in memory, no separate merge pass."""
    from ..kernels.flash import to_packed
    from ..kernels.flash import triton as tk

    cu_q, cu_k = segs.on(q.device)
    tk.attention_forward(to_packed(q), to_packed(k), to_packed(v), cu_q, cu_k, segs.max_q,
                         causal=segs.mask == "causal", scale=scale, out_dtype=torch.float32, out=out[0], lse=lse[0],
                         accumulate=True)


def block_backward_into(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                        dout: torch.Tensor, segs: BlockSegments, scale: float, dq: torch.Tensor, dk: torch.Tensor,
                        dv: torch.Tensor) -> None:
    """Batch 1: add this block's gradients into the fp32 accumulators ``dq`` [1, Sq, Hq, D], ``dk``/``dv``
    [1, Sk, Hkv, D] (views of the ring's buffers) inside the kernels, in place."""
    from ..kernels.flash import lse_from_user, to_packed
    from ..kernels.flash import triton as tk

    cu_q, cu_k = segs.on(q.device)
    tk.attention_backward(to_packed(dout), to_packed(q), to_packed(k), to_packed(v), to_packed(out),
                          lse_from_user(lse, q), cu_q, cu_k, segs.max_q, segs.max_k, causal=segs.mask == "causal",
                          scale=scale, acc=(dq[0], dk[0], dv[0]))
