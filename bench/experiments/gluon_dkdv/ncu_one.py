"""One backward (hybrid: Gluon dk/dv + Triton dq) for ncu: S=$S, S2=$S2 (0/1), MODE=$MODE (1: the fused dq).
ncu --clock-control none -k regex:dkdv --metrics ... python bench/experiments/gluon_dkdv/ncu_one.py"""
import os

import torch

from longreach.kernels.flash import triton as tk
from longreach.kernels.s2 import S2Pattern
from longreach.kernels.s2.triton import sparse_args

S = int(os.environ.get("S", "32768"))
s2 = os.environ.get("S2", "1") == "1"
mode = int(os.environ.get("MODE", "0"))
tk.OVERRIDE.update(gluon_bwd=True, gluon_atomic_dq=mode != 0)
hq, hkv, d = 32, 8, 128
torch.manual_seed(0)
q = torch.randn(S, hq, d, device="cuda", dtype=torch.bfloat16)
k, v = (torch.randn(S, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
do = torch.randn_like(q)
cu = torch.tensor([0, S], dtype=torch.int32, device="cuda")
sp = sparse_args(S2Pattern(128, 2048, 128, 8), hkv, "cuda") if s2 else None
pack = hq // hkv if s2 else 1
out, lse = tk.attention_forward(q, k, v, cu, cu, S, causal=True, scale=d ** -0.5, out_dtype=q.dtype, sparse=sp,
                                pack=pack)
tk.attention_backward(do, q, k, v, out, lse, cu, cu, S, S, causal=True, scale=d ** -0.5, sparse=sp, pack=pack)
torch.cuda.synchronize()
