"""Load a Gluon backward variant (variants/<name>.py) and call it with the Triton backward's contract."""
import importlib.util
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def load(name: str):
    spec = importlib.util.spec_from_file_location("gluon_bwd_" + name, os.path.join(HERE, "variants", name + ".py"))
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def backward(mod, do, q, k, v, out, lse, cu, max_len, *, causal, sparse=None, acc=None):
    """-> (dq, dk, dv): bf16 like the inputs, or added into the fp32 ``acc`` buffers (the ring's mode)."""
    scale = q.shape[-1] ** -0.5
    if acc is None:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
    else:
        dk, dv = acc[1].clone(), acc[2].clone()
    buf = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if acc is None else acc[0].clone()
    dense = sparse.dense_heads if sparse is not None else None
    sp = (sparse.block, sparse.window_blocks, sparse.sink_blocks, sparse.stride) if sparse is not None else (128, 1, 0, 1)
    mod.attention_backward(do, q, k, v, out, lse, cu, cu, max_len, max_len, causal=causal, scale=scale, dq=buf, dk=dk,
                           dv=dv, accumulate=acc is not None, sparse=sparse, dense_heads=dense, sp=sp)
    return (buf.to(q.dtype) if acc is None else buf), dk, dv
